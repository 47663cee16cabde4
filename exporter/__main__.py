import sys

from exporter.interrupts import exit_at_once

with exit_at_once():
    from exporter.cli import main  # imports onnxruntime: a second in which Ctrl-C may come

sys.exit(main())
