"""The paper's Tables 3-6 in miniature: ``python benchmarks/paper_tables.py [--quick] [--out DIR] ...``.

The same as ``genieblue bench paper``; see ``genieblue_hf.miniature`` and docs/paper_in_miniature.md.
"""

import sys

from genieblue_hf.cli import main


if __name__ == "__main__":
    sys.exit(main(["bench", "paper", *sys.argv[1:]]))
