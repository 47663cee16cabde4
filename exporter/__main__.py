import sys

from .interrupts import exit_at_once

with exit_at_once():
    from .cli import main  # imports onnxruntime: a second in which Ctrl-C may come

sys.exit(main())
