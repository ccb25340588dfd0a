"""Copy a model to an S3 mirror, for clusters without access to the Hugging Face hub.

    python jobs/mirror_model.py Qwen/Qwen2.5-1.5B-Instruct s3://bucket/models/qwen2.5-1.5b [--revision REV]
    python jobs/mirror_model.py ./my-model-dir s3://bucket/models/my-model

Uploads the model's files (a hub id is downloaded first, with $HF_TOKEN for gated models) and last
`chameleon-model.json`: every file's sha256 and size, and the model's fingerprint. Jobs and
servers then use `--model s3://bucket/models/qwen2.5-1.5b`: each node downloads it once and checks
it (`chameleon.data.model_mirror`). S3 settings: the usual AWS_* variables and
CHAMELEON_S3_ENDPOINT (or --s3-endpoint).
"""

import argparse
import sys
from pathlib import Path

# `python jobs/mirror_model.py` puts jobs/ first on sys.path; make the project importable from a
# checkout too, where the package may not be installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chameleon.data.model_mirror import mirror_model
from chameleon.data.storage import open_store


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hugging Face model id or local directory (save_pretrained output)")
    p.add_argument("dest", help="s3://bucket/prefix of the mirror")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) [default: the main branch]")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL [default: CHAMELEON_S3_ENDPOINT]")
    args = p.parse_args()
    local = Path(args.model)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(args.model, revision=args.revision))
    store = open_store(args.dest, **({"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {}))
    record = mirror_model(local, store)
    size = sum(f["bytes"] for f in record["files"].values())
    print(f"mirrored {len(record['files'])} files ({size / 2**30:.2f} GiB) to {args.dest}")
    print(f"use: --model {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
