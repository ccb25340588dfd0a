"""Entrypoint for `ray job submit ... -- python jobs/personalize.py --input ... --store ...`.

Thin on purpose: the flags are those of `chameleon personalize` (see `--help`).
"""

import sys
from pathlib import Path

# `python jobs/personalize.py` puts jobs/ first on sys.path; make the project importable from a
# `--working-dir` checkout too, where the package may not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chameleon.cli import main

if __name__ == "__main__":
    sys.exit(main(["personalize", *sys.argv[1:]]))
