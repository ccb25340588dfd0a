"""Entrypoint for the endpoint: `python jobs/serve.py --store s3://bucket/prefix [--run latest] ...`.

Thin on purpose: the flags are those of `chameleon serve` (see `--help`). On a cluster,
`serve deploy cluster/serve-config.yaml` (or the RayService manifest) deploys the same app.
"""

import sys
from pathlib import Path

# `python jobs/serve.py` puts jobs/ first on sys.path; make the project importable from a
# `--working-dir` checkout too, where the package may not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chameleon.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
