import sys


def _interrupted(err: BaseException | None) -> bool:
    """Ctrl-C, also where a C extension's import turned it into an ImportError (onnxruntime's does)."""
    while err is not None:
        if isinstance(err, KeyboardInterrupt):
            return True
        err = err.__cause__ or err.__context__
    return False


try:
    from .cli import main  # imports onnxruntime (and torch for builds): seconds in which Ctrl-C may come

    sys.exit(main())
except (KeyboardInterrupt, ImportError) as err:
    if not _interrupted(err):
        raise
    print("interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)
