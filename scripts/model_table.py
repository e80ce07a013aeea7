"""Print the Markdown table of README's models section: backbone and detector parameters and GFLOPs.

    python scripts/model_table.py --imgsz 640 --compare-ultralytics
"""

import sys

from yolo_mobile.cli import main

if __name__ == "__main__":
    sys.exit(main(["models", "--table", *sys.argv[1:]]))
