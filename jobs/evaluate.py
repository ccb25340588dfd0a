"""Entrypoint for the LaMP-7 evaluation: `python jobs/evaluate.py --out DIR ...` locally, or
`ray job submit --working-dir . -- python jobs/evaluate.py --ray --out DIR ...` on a cluster
(the synthesis then runs as the Ray job's map stage, and every method's answers on an actor pool of
the same shape: `--num-actors`, `--num-gpus-per-actor`; give `--store s3://…` that every node
reaches). Flags: those of `chameleon eval --help`; this is `chameleon eval` with logging set up by
`chameleon.cli.main`.
"""

import sys
from pathlib import Path

# `python jobs/evaluate.py` puts jobs/ first on sys.path; make the project importable from a
# `--working-dir` checkout too, where the package may not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chameleon.cli import main as chameleon_main


def main(argv: list[str]) -> int:
    return chameleon_main(["eval", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
