"""User records and their validation.

A user record is one JSON object (JSONL line or Parquet row):

    {"user_id": "u1", "history": [{"text": "...", "input": "optional query"}, ...],
     "query": "optional test question", "group_id": "optional"}

`history` items may also be plain strings. A LaMP question (`id`, `input`, `profile`) is accepted
too and converted. Invalid records never stop a job: `validate_records` returns the accepted
users and one reject (with a reason) per bad record, whatever the record holds: any exception
while checking one record is that record's reject, and a reject's copy of the record is made
JSON-safe (`json_safe`), so writing `rejects.jsonl` cannot fail on it either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chameleon.core.records import HistoryItem, UserRecord
from chameleon.data.ids import ID_RULE, is_valid_id


@dataclass(frozen=True)
class Reject:
    index: int
    """Position of the record in the input (0-based)."""
    user_id: str | None
    reason: str
    record: Any = None
    """The offending record, kept so nothing is lost (truncated when huge)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe row of `rejects.jsonl` (strict JSON, any Unicode, no lone surrogates)."""
        return {
            "index": self.index,
            "user_id": json_safe(self.user_id),
            "reason": json_safe(self.reason),
            "record": json_safe(self.record),
        }


UNREADABLE = "_unreadable"
"""Key of a placeholder record (`chameleon.data.inputs`): input that could not be decoded, and why."""


class InvalidRecord(ValueError):
    pass


def _text(value: Any, what: str, max_chars: int) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord(f"{what} is not valid UTF-8") from exc
    if not isinstance(value, str):
        raise InvalidRecord(f"{what} must be a string, got {type(value).__name__}")
    if "\ufffd" in value:
        raise InvalidRecord(f"{what} contains undecodable text (U+FFFD)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800"): no tokenizer can take it
        raise InvalidRecord(f"{what} contains a lone surrogate (invalid Unicode)") from exc
    if "\x00" in value:
        raise InvalidRecord(f"{what} contains a NUL character")
    if not value.strip():
        raise InvalidRecord(f"{what} is empty")
    if len(value) > max_chars:
        raise InvalidRecord(f"{what} has {len(value)} characters (limit {max_chars})")
    return value


def lamp_record(raw: dict[str, Any], query_template: str | None) -> dict[str, Any]:
    """A LaMP question (`id`, `input`, `profile`) as a user record (`user_id`, `history`, `query`)."""
    history = []
    profile = raw.get("profile")
    if not isinstance(profile, list):
        # A number is not iterable, and a string or dict would iterate into one-letter items.
        raise InvalidRecord(f"profile must be a list, got {type(profile).__name__}")
    for item in profile:
        if isinstance(item, dict):
            text = item.get("text", item.get("output", item.get("abstract")))
            history.append(
                {
                    "text": text,
                    "input": query_template.format(text=text)
                    if query_template and isinstance(text, str)
                    else None,
                }
            )
        else:
            history.append(item)
    return {"user_id": raw.get("id"), "history": history, "query": raw.get("input")}


def parse_record(
    raw: Any,
    *,
    max_history_items: int = 512,
    max_item_chars: int = 4000,
    query_template: str | None = None,
    group_column: str | None = None,
) -> UserRecord:
    """Validate one raw record; raise `InvalidRecord` with the reason."""
    if not isinstance(raw, dict):
        raise InvalidRecord(f"record must be an object, got {type(raw).__name__}")
    if UNREADABLE in raw:
        raise InvalidRecord(f"unreadable input ({raw[UNREADABLE]})")
    if "user_id" not in raw and "profile" in raw:
        raw = {**raw, **lamp_record(raw, query_template)}
    uid = _int_as_id(raw.get("user_id"), "user_id")
    if uid is None or uid == "":
        raise InvalidRecord("missing user_id")
    if not isinstance(uid, str):
        raise InvalidRecord(f"user_id must be a string, got {type(uid).__name__}")
    if not is_valid_id(uid):
        raise InvalidRecord(f"user_id must be {ID_RULE}")
    history_raw = raw.get("history")
    if not isinstance(history_raw, list):
        raise InvalidRecord("history must be a list" if history_raw is not None else "missing history")
    if not history_raw:
        raise InvalidRecord("history is empty")
    if len(history_raw) > max_history_items:
        raise InvalidRecord(f"history has {len(history_raw)} items (limit {max_history_items})")
    items = []
    for i, item in enumerate(history_raw):
        if isinstance(item, dict):
            text = _text(item.get("text"), f"history[{i}].text", max_item_chars)
            inp = item.get("input")
            inp = _text(inp, f"history[{i}].input", max_item_chars) if inp not in (None, "") else None
        else:
            text, inp = _text(item, f"history[{i}]", max_item_chars), None
        if inp is None and query_template:
            inp = query_template.format(text=text)
        items.append(HistoryItem(text=text, input=inp))
    query = raw.get("query")
    query = _text(query, "query", max_item_chars) if query not in (None, "") else None
    group = raw.get(group_column) if group_column else raw.get("group_id")
    if group is not None:
        group = _int_as_id(group, "group id")
        if not isinstance(group, str):
            # str() would turn NaN into "nan" and pool every NaN user into one group.
            raise InvalidRecord(f"group id must be a string, got {type(group).__name__}")
        if not is_valid_id(group):
            raise InvalidRecord(f"group id must be {ID_RULE}")
    return UserRecord(user_id=uid, history=tuple(items), query=query, group_id=group)


def _int_as_id(value: Any, what: str) -> Any:
    """Integer ids become strings (LaMP ids are ints); bools are not ids."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 430:  # > 128 digits: not an id (and str() fails past 4300 digits)
            raise InvalidRecord(f"{what} is an integer of more than 128 digits")
        return str(value)
    return value


_MAX_ITEMS = 64
_MAX_DEPTH = 8
_MAX_STR = 2000


def json_safe(value: Any, limit: int = _MAX_STR, _depth: int = 0) -> Any:
    """A copy of `value` that strict JSON can always encode as UTF-8 (for `rejects.jsonl`).

    Lone surrogates and undecodable bytes become backslash escapes, huge integers and
    non-finite floats become strings, other objects their repr; strings, containers and
    depth are capped (a cut is marked with `…`). Nothing here can raise.
    """
    try:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value if value.bit_length() <= 64 else f"<integer of {value.bit_length()} bits>"
        if isinstance(value, float):
            return value if value == value and abs(value) != float("inf") else repr(value)
        if isinstance(value, bytes | bytearray | memoryview):
            value = bytes(value[: limit + 1]).decode("utf-8", "backslashreplace")
        if isinstance(value, str):
            text = value[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
            return text + "…" if len(value) > limit else text
        if _depth >= _MAX_DEPTH:
            return "…"
        if isinstance(value, dict):
            items = list(value.items())
            out = {
                str(json_safe(k, 200, _depth + 1)): json_safe(v, limit, _depth + 1)
                for k, v in items[:_MAX_ITEMS]
            }
            if len(items) > _MAX_ITEMS:
                out["…"] = f"{len(items) - _MAX_ITEMS} more keys"
            return out
        if isinstance(value, list | tuple):
            out_list = [json_safe(v, limit, _depth + 1) for v in value[:_MAX_ITEMS]]
            return out_list + ["…"] if len(value) > _MAX_ITEMS else out_list
        return json_safe(repr(value), limit, _depth + 1)
    except Exception as exc:  # e.g. a repr that raises
        return f"<unprintable {type(value).__name__}: {type(exc).__name__}>"


def _uid_of(raw: Any) -> str | None:
    uid = raw.get("user_id", raw.get("id")) if isinstance(raw, dict) else None
    return uid if isinstance(uid, str) else None


def validate_records(raw_records: Iterable[Any], **kwargs: Any) -> tuple[list[UserRecord], list[Reject]]:
    """Split raw records into accepted users and rejects; duplicate ids are all rejected
    (which one is right cannot be known, and merging would mix data)."""
    parsed: list[tuple[int, UserRecord]] = []
    rejects: list[Reject] = []
    for i, raw in enumerate(raw_records):
        try:
            parsed.append((i, parse_record(raw, **kwargs)))
        except InvalidRecord as exc:
            rejects.append(Reject(i, _uid_of(raw), str(exc), json_safe(raw)))
        except Exception as exc:  # any other failure on one record is that record's reject
            reason = f"invalid record ({type(exc).__name__}: {json_safe(str(exc), 300)})"
            rejects.append(Reject(i, _uid_of(raw), reason, json_safe(raw)))
    counts: dict[str, int] = {}
    for _, rec in parsed:
        counts[rec.user_id] = counts.get(rec.user_id, 0) + 1
    accepted = []
    for i, rec in parsed:
        if counts[rec.user_id] > 1:
            rejects.append(
                Reject(
                    i,
                    rec.user_id,
                    f"duplicate user_id ({counts[rec.user_id]} records)",
                    json_safe(rec.to_dict()),
                )
            )
        else:
            accepted.append(rec)
    rejects.sort(key=lambda r: r.index)
    return accepted, rejects
