"""Read raw user records from JSONL, JSON (a LaMP questions file) or Parquet, local or `s3://`.

No single record can stop the job: a JSONL line or JSON element that cannot be decoded (bad
UTF-8, bad JSON, an integer past Python's 4,300-digit limit, nesting past the recursion limit,
duplicate keys, NaN/Infinity, more than `synth.max_record_bytes`) and a Parquet row that cannot be
converted come back as placeholder records, which the validator rejects with the reason. Only a
file that cannot be read at all (unknown format, not Parquet, not a JSON list) is an error.
A UTF-8 byte-order mark is skipped, and CR, LF and CRLF all end a JSONL line.
"""

from __future__ import annotations

import fnmatch
import io
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from chameleon.config import ChameleonConfig
from chameleon.core.records import UserRecord
from chameleon.data.schema import UNREADABLE, Reject, json_safe, validate_records
from chameleon.data.storage import open_store

BOM = b"\xef\xbb\xbf"


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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        # Which copy is meant cannot be known; JSON's "last one wins" would hide the conflict.
        raise ValueError(f"duplicate key {json_safe(dup, 100)!r}")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str | bytes) -> Any:
    """`json.loads` that refuses duplicate keys and NaN/Infinity (ValueError)."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)


def unreadable(where: str, exc: BaseException | str, raw: bytes | str) -> dict[str, Any]:
    """A placeholder record for input that could not be decoded; validation rejects it."""
    why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {json_safe(str(exc), 300)}"
    return {UNREADABLE: f"{where}: {why}", "raw": json_safe(raw[:200])}


def _decode(chunk: bytes | str, where: str, max_bytes: int) -> Any:
    """One record from its text, or a placeholder saying why not."""
    if len(chunk) > max_bytes:
        return unreadable(where, f"record of {len(chunk)} bytes (limit {max_bytes})", chunk)
    try:
        return loads_strict(chunk)
    except Exception as exc:  # JSON errors, ValueError (huge ints), RecursionError (deep nesting)
        return unreadable(where, exc, chunk)


def parse_jsonl(data: bytes, max_record_bytes: int = 2**62) -> list[Any]:
    """One record per non-blank line, in order (placeholders for lines that cannot be decoded)."""
    records: list[Any] = []
    for lineno, line in enumerate(data.splitlines(), 1):
        line = line.removeprefix(BOM)
        if not line.strip():
            continue
        records.append(_decode(line, f"line {lineno}", max_record_bytes))
    return records


# Strings (with escapes) or one structural character: enough to find a JSON array's elements
# without decoding them, so one element that cannot be decoded leaves the others readable.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.S)


def _array_elements(text: str) -> list[str] | None:
    """The source text of each element of a top-level JSON array, or None if `text` is not one."""
    body = text.lstrip()
    if not body.startswith("["):
        return None
    elements: list[str] = []
    depth, start = 0, None
    for m in _JSON_TOKEN.finditer(body):
        tok = m.group()
        if tok[0] == '"':
            continue
        if tok in "[{":
            depth += 1
            if depth == 1:
                start = m.end()
        elif tok in "]}":
            depth -= 1
            if depth == 0:
                last = body[start : m.start()]
                if last.strip() or elements:
                    elements.append(last)
                return elements
        elif depth == 1:
            elements.append(body[start : m.start()])
            start = m.end()
    if start is not None and body[start:].strip():
        elements.append(body[start:])  # unterminated array: the rest is one (unreadable) element
    return elements


def parse_json_list(data: bytes, max_record_bytes: int = 2**62, where: str = "input") -> list[Any]:
    """The elements of a JSON list (a LaMP questions file); an element that cannot be decoded
    becomes a placeholder. Raises ValueError when the file is not a JSON list at all."""
    text = data.removeprefix(BOM).decode("utf-8", "surrogateescape")
    try:
        obj = loads_strict(text)
    except Exception:
        obj = None  # some element is bad: decode element by element
    else:
        if not isinstance(obj, list):
            raise ValueError(
                f"{where}: expected a JSON list of records (a LaMP questions file), got {type(obj).__name__}"
            )
        if len(data) <= max_record_bytes:
            return obj
    elements = _array_elements(text)
    if elements is None:
        raise ValueError(f"{where}: expected a JSON list of records (a LaMP questions file)")
    records = []
    for i, chunk in enumerate(elements):
        raw = chunk.encode("utf-8", "surrogateescape")
        try:
            records.append(_decode(raw.decode("utf-8"), f"element {i}", max_record_bytes))
        except UnicodeDecodeError as exc:
            records.append(unreadable(f"element {i}", exc, raw))
    return records


def parquet_records(data: bytes) -> list[Any]:
    """Rows of a Parquet file as dicts; a row whose values cannot be converted becomes a
    placeholder (a file that is not Parquet raises, naming pyarrow's reason)."""
    parquet = pq.ParquetFile(io.BytesIO(data))  # not read_table: its dataset path refuses duplicate columns
    names = parquet.schema_arrow.names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        # to_pylist() would keep one of them silently.
        n_rows = parquet.metadata.num_rows
        return [unreadable(f"row {i}", f"duplicate columns {dup}", b"") for i in range(n_rows)]
    records: list[Any] = []
    for batch in parquet.iter_batches(batch_size=1024):
        try:
            records.extend(batch.to_pylist())
        except Exception:
            for i in range(batch.num_rows):
                row = len(records)
                try:
                    records.extend(batch.slice(i, 1).to_pylist())
                except Exception as exc:
                    records.append(unreadable(f"row {row}", exc, b""))
    return records


def read_user_records(uri: str, max_record_bytes: int = 2**62, **store_options: Any) -> list[Any]:
    """All raw records of a users file; the format follows the extension."""
    data = read_bytes(uri, **store_options)
    lower = uri.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return parse_jsonl(data, max_record_bytes)
    if lower.endswith(".json"):
        return parse_json_list(data, max_record_bytes, uri)
    if lower.endswith(".parquet"):
        try:
            return parquet_records(data)
        except pa.ArrowException as exc:
            raise ValueError(f"{uri}: not a readable Parquet file ({exc})") from exc
    raise ValueError(f"{uri}: unknown users file format (use .jsonl, .json or .parquet)")


INPUT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_GLOB = re.compile(r"[*?\[]")


def expand_input(uri: str, **store_options: Any) -> list[str]:
    """The users files an `--input` names, sorted: one file, a directory (local or an `s3://`
    prefix ending in `/` or holding no file of that name) of `.jsonl`/`.ndjson`/`.json`/`.parquet`
    files, or a glob of them (`*`, `?`, `[...]` in the last path segments). Raises
    FileNotFoundError when it names no file."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if _GLOB.search(uri):
        cut = _GLOB.search(uri).start()  # list below the last folder before the first wildcard
        root = uri[: uri.rfind("/", 0, cut) + 1] if "/" in uri[:cut] else ""
        found = [f for f in _list_files(root or ".", **store_options) if fnmatch.fnmatchcase(f, uri)]
    elif uri.lower().endswith(INPUT_SUFFIXES) and not uri.endswith("/"):
        return [uri]
    else:
        found = _list_files(uri, **store_options)
    files = sorted(f for f in found if f.lower().endswith(INPUT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{uri}: no users files (.jsonl, .ndjson, .json, .parquet) found")
    return files


def _list_files(root: str, **store_options: Any) -> list[str]:
    """Every file below `root` (a local directory or an `s3://` prefix), as full URIs."""
    if root.startswith("s3://"):
        base = root.rstrip("/")
        return [f"{base}/{key}" for key in open_store(base, **store_options).list("")]
    path = Path(root)
    if not path.is_dir():
        return []
    prefix = "" if root in (".", "") else root.rstrip("/") + "/"
    return [prefix + str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]


def read_input_records(uri: str, max_record_bytes: int = 2**62, **store_options: Any) -> list[Any]:
    """The raw records of every users file `uri` names (`expand_input`), file after file."""
    records: list[Any] = []
    for f in expand_input(uri, **store_options):
        records.extend(read_user_records(f, max_record_bytes, **store_options))
    return records


@dataclass
class PreparedInput:
    """A users file after validation: the accepted users in input order, and every reject."""

    users: list[UserRecord]
    rejects: list[Reject]
    n_input: int


def prepare_input(input_uri: str, cfg: ChameleonConfig, **store_options: Any) -> PreparedInput:
    """Read and validate the users files under the configured limits (rejects keep their reason)."""
    raw = read_input_records(input_uri, cfg.synth.max_record_bytes, **store_options)
    users, rejects = validate_records(
        raw,
        max_history_items=cfg.synth.max_history_items,
        max_item_chars=cfg.synth.max_item_chars,
        group_column=cfg.groups.group_column,
    )
    return PreparedInput(users, rejects, len(raw))
