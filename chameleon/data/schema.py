"""User records and their validation.

A user record is one JSON object (JSONL line or Parquet row):

    {"user_id": "u1", "history": [{"text": "...", "input": "optional query"}, ...],
     "query": "optional test question", "group_id": "optional"}

`history` items may also be plain strings. A LaMP question (`id`, `input`, `profile`) is accepted
too and converted. Invalid records never stop a job: `validate_records` returns the accepted
users and one reject (with a reason) per bad record.
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
        return {"index": self.index, "user_id": self.user_id, "reason": self.reason, "record": self.record}


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
    for item in raw.get("profile") or []:
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
    if "_unreadable" in raw:
        raise InvalidRecord(f"unreadable input ({raw['_unreadable']})")
    if "user_id" not in raw and "profile" in raw:
        raw = {**raw, **lamp_record(raw, query_template)}
    uid = raw.get("user_id")
    if isinstance(uid, int) and not isinstance(uid, bool):
        uid = str(uid)
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
        group = str(group)
        if not is_valid_id(group):
            raise InvalidRecord(f"group id must be {ID_RULE}")
    return UserRecord(user_id=uid, history=tuple(items), query=query, group_id=group)


def _shorten(raw: Any, limit: int = 2000) -> Any:
    text = repr(raw)
    return raw if len(text) <= limit else text[:limit] + "…"


def validate_records(raw_records: Iterable[Any], **kwargs: Any) -> tuple[list[UserRecord], list[Reject]]:
    """Split raw records into accepted users and rejects; duplicate ids are all rejected
    (which one is right cannot be known, and merging would mix data)."""
    parsed: list[tuple[int, UserRecord]] = []
    rejects: list[Reject] = []
    for i, raw in enumerate(raw_records):
        try:
            parsed.append((i, parse_record(raw, **kwargs)))
        except InvalidRecord as exc:
            uid = raw.get("user_id", raw.get("id")) if isinstance(raw, dict) else None
            rejects.append(Reject(i, uid if isinstance(uid, str) else None, str(exc), _shorten(raw)))
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
                    _shorten(rec.to_dict()),
                )
            )
        else:
            accepted.append(rec)
    rejects.sort(key=lambda r: r.index)
    return accepted, rejects
