import sys

try:
    from .cli import main  # imports torch and onnx: seconds in which Ctrl-C should not print a traceback

    sys.exit(main())
except KeyboardInterrupt:
    print("interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)
