"""Read raw user records from JSONL, JSON (a LaMP questions file) or Parquet, local or `s3://`.

Undecodable lines are not fatal: they come back as records the validator rejects with a reason,
so one bad line never hides the rest of a file.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from chameleon.config import ChameleonConfig
from chameleon.core.records import UserRecord
from chameleon.data.schema import Reject, validate_records
from chameleon.data.storage import open_store


def _split_uri(uri: str) -> tuple[str, str]:
    if uri.startswith("s3://"):
        head, name = posixpath.split(uri.rstrip("/"))
        return head, name
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    head, name = posixpath.split(uri)
    return head or ".", name


def read_bytes(uri: str, **store_options: Any) -> bytes:
    head, name = _split_uri(uri)
    return open_store(head, **store_options).get_bytes(name)


def parse_jsonl(data: bytes) -> list[Any]:
    records: list[Any] = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            # Kept as a placeholder that validation rejects with this reason.
            records.append(
                {
                    "_unreadable": f"line {lineno}: {type(exc).__name__}: {exc}",
                    "raw": line[:200].decode("utf-8", "replace"),
                }
            )
    return records


def read_user_records(uri: str, **store_options: Any) -> list[Any]:
    """All raw records of a users file; the format follows the extension."""
    data = read_bytes(uri, **store_options)
    lower = uri.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return parse_jsonl(data)
    if lower.endswith(".json"):
        obj = json.loads(data.decode("utf-8"))
        if not isinstance(obj, list):
            raise ValueError(
                f"{uri}: expected a JSON list of records (a LaMP questions file), got {type(obj).__name__}"
            )
        return obj
    if lower.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    raise ValueError(f"{uri}: unknown users file format (use .jsonl, .json or .parquet)")


@dataclass
class PreparedInput:
    """A users file after validation: the accepted users in input order, and every reject."""

    users: list[UserRecord]
    rejects: list[Reject]
    n_input: int


def prepare_input(input_uri: str, cfg: ChameleonConfig, **store_options: Any) -> PreparedInput:
    """Read and validate the users file under the configured limits (rejects keep their reason)."""
    raw = read_user_records(input_uri, **store_options)
    users, rejects = validate_records(
        raw,
        max_history_items=cfg.synth.max_history_items,
        max_item_chars=cfg.synth.max_item_chars,
        group_column=cfg.groups.group_column,
    )
    return PreparedInput(users, rejects, len(raw))
