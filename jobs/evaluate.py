"""Entrypoint for the LaMP-7 evaluation: `python jobs/evaluate.py --out DIR ...` locally, or
`ray job submit --working-dir . -- python jobs/evaluate.py --ray --out DIR ...` on a cluster
(the synthesis then runs as the Ray job's map stage, and every method's answers on an actor pool of
the same shape: `--num-actors`, `--num-gpus-per-actor`; give `--store s3://…` that every node
reaches). Flags: those of `chameleon eval --help`.
"""

import argparse
import sys
from pathlib import Path

# `python jobs/evaluate.py` puts jobs/ first on sys.path; make the project importable from a
# `--working-dir` checkout too, where the package may not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chameleon.eval_cli import add_eval_parser  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/evaluate.py")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
