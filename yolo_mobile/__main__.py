"""``python -m yolo_mobile``: the CLI, so that ``torchrun -m yolo_mobile train ...`` works."""

import sys

from .cli import main

sys.exit(main())
