"""Malformed user records, one kind each, for the poison-input tests and bench.

Every kind makes one JSON value (bytes without line breaks) for a user id and a short text, so it
can be a JSONL line or an element of a LaMP JSON list; `PARQUET_KINDS` make whole Parquet tables
with odd schemas. `accepted` says what the validator must do with it; every other record must be
rejected with a reason, and none may stop the job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa

HUGE_INT = b"9" * 5000
"""More digits than Python's int parser allows (4,300): json.loads raises ValueError."""
DEEP = 1000
"""Nesting past the JSON decoder's recursion limit: RecursionError."""
OVERSIZED = 9 * 2**20
"""Bytes of the oversized record: more than the default `synth.max_record_bytes` (8 MiB)."""


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[str, str], bytes]
    """(user id, text) -> one JSON value, no line breaks."""
    accepted: bool = False
    json_element: bool = True
    """Brackets balance, so it can stand as an element of a JSON list."""


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _user(uid: str, text: str, **fields: object) -> dict:
    return {"user_id": uid, "history": [text, {"text": text + "!", "input": "q"}], **fields}


def good_record(uid: str, text: str) -> bytes:
    return _j(_user(uid, text))


def _lamp(uid: str, text: str, profile: object) -> bytes:
    return _j({"id": uid, "input": "Paraphrase: " + text, "profile": profile})


GOOD_KINDS = [
    Kind("plain", good_record, accepted=True),
    Kind("string_items", lambda u, t: _j({"user_id": u, "history": [t, t + "?"]}), accepted=True),
    Kind("with_group", lambda u, t: _j(_user(u, t, group_id="team-a")), accepted=True),
    Kind("lamp_question", lambda u, t: _lamp(u, t, [{"text": t, "id": "1"}]), accepted=True),
    Kind("unknown_fields", lambda u, t: _j(_user(u, t, extra={"a": [1, 2]})), accepted=True),
]

MALFORMED_KINDS = [
    Kind("huge_int_user_id", lambda u, t: b'{"user_id": ' + HUGE_INT + b', "history": ["x"]}'),
    Kind("huge_int_field", lambda u, t: good_record(u, t)[:-1] + b', "n": ' + HUGE_INT + b"}"),
    Kind(
        "deep_nesting",
        lambda u, t: b'{"user_id": "' + u.encode() + b'", "h": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    ),
    Kind("lone_surrogate_text", lambda u, t: _j(_user(u, t + "\ud800"))),
    Kind("lone_surrogate_user_id", lambda u, t: _j(_user(u + "\udfff", t))),
    Kind("invalid_utf8", lambda u, t: b'{"user_id": "' + u.encode() + b'", "history": ["\xff\xfe"]}'),
    Kind("not_json", lambda u, t: b"oops " + u.encode()),
    Kind("truncated_json", lambda u, t: good_record(u, t)[:-3], json_element=False),
    Kind("array_record", lambda u, t: _j([u, t])),
    Kind("null_record", lambda u, t: b"null"),
    Kind("number_record", lambda u, t: b"42"),
    Kind("string_record", lambda u, t: _j(t)),
    Kind("missing_user_id", lambda u, t: _j({"history": [t]})),
    Kind("empty_user_id", lambda u, t: _j(_user("", t))),
    Kind("user_id_path", lambda u, t: _j(_user("../" + u, t))),
    Kind("user_id_bool", lambda u, t: _j(_user(True, t))),  # type: ignore[arg-type]
    Kind("user_id_float", lambda u, t: _j(_user(1.5, t))),  # type: ignore[arg-type]
    Kind("user_id_nan", lambda u, t: b'{"user_id": NaN, "history": ["x"]}'),
    Kind("missing_history", lambda u, t: _j({"user_id": u})),
    Kind("history_string", lambda u, t: _j({"user_id": u, "history": t})),
    Kind("history_empty", lambda u, t: _j({"user_id": u, "history": []})),
    Kind("history_item_number", lambda u, t: _j({"user_id": u, "history": [3]})),
    Kind("history_item_no_text", lambda u, t: _j({"user_id": u, "history": [{"input": t}]})),
    Kind("history_item_list", lambda u, t: _j({"user_id": u, "history": [[t]]})),
    Kind("text_nul", lambda u, t: _j(_user(u, t + "\x00"))),
    Kind("text_replacement_char", lambda u, t: _j(_user(u, t + "\ufffd"))),
    Kind("text_blank", lambda u, t: _j({"user_id": u, "history": ["   "]})),
    Kind("text_too_long", lambda u, t: _j({"user_id": u, "history": ["x" * 5000]})),
    Kind("too_many_items", lambda u, t: _j({"user_id": u, "history": ["x"] * 600})),
    Kind("query_number", lambda u, t: _j(_user(u, t, query=7))),
    Kind("group_nan", lambda u, t: good_record(u, t)[:-1] + b', "group_id": NaN}'),
    Kind("group_infinity", lambda u, t: good_record(u, t)[:-1] + b', "group_id": -Infinity}'),
    Kind("group_float", lambda u, t: _j(_user(u, t, group_id=1.5))),
    Kind("group_object", lambda u, t: _j(_user(u, t, group_id={"a": 1}))),
    Kind("group_bad_chars", lambda u, t: _j(_user(u, t, group_id="team a/b"))),
    Kind("duplicate_keys", lambda u, t: good_record(u, t)[:-1] + b', "user_id": "other"}'),
    Kind("oversized", lambda u, t: _j(_user(u, t, blob="x" * OVERSIZED))),
    Kind("lamp_profile_number", lambda u, t: _lamp(u, t, 5)),
    Kind("lamp_profile_string", lambda u, t: _lamp(u, t, t)),
    Kind("lamp_profile_dict", lambda u, t: _lamp(u, t, {"text": t})),
    Kind("lamp_profile_null", lambda u, t: _lamp(u, t, None)),
]


# -- Parquet: whole tables with odd schemas -----------------------------------------------------


def _hist(texts: list[str]) -> list[list[dict]]:
    return [[{"text": t, "input": None}] for t in texts]


@dataclass(frozen=True)
class TableKind:
    name: str
    make: Callable[[list[str], list[str]], pa.Table]
    """(user ids, texts) -> a table of one row per user."""
    accepted: bool = False


PARQUET_KINDS = [
    TableKind("good", lambda u, t: pa.table({"user_id": u, "history": _hist(t)}), accepted=True),
    TableKind(
        "history_list_string", lambda u, t: pa.table({"user_id": u, "history": [[x] for x in t]}), True
    ),
    TableKind(
        "odd_extra_columns",
        lambda u, t: pa.table(
            {
                "user_id": u,
                "history": _hist(t),
                "ts": pa.array([datetime(2020, 1, 1, tzinfo=UTC)] * len(u)),
                "blob": pa.array([b"\xff\x00"] * len(u), pa.binary()),
                "price": pa.array([Decimal("1.10")] * len(u)),
                "tags": pa.array([[("k", 1)]] * len(u), pa.map_(pa.string(), pa.int64())),
            }
        ),
        accepted=True,
    ),
    TableKind(
        "user_id_float_nulls",
        lambda u, t: pa.table({"user_id": [None, *[1.0] * (len(u) - 1)], "history": _hist(t)}),
    ),
    TableKind(
        "user_id_binary",
        lambda u, t: pa.table(
            {"user_id": pa.array([x.encode() for x in u], pa.binary()), "history": _hist(t)}
        ),
    ),
    TableKind("history_string_column", lambda u, t: pa.table({"user_id": u, "history": t})),
    TableKind(
        "history_null",
        lambda u, t: pa.table({"user_id": u, "history": pa.nulls(len(u), pa.list_(pa.string()))}),
    ),
    TableKind(
        "history_struct_int_text", lambda u, t: pa.table({"user_id": u, "history": [[{"text": 3}]] * len(u)})
    ),
    TableKind(
        "history_binary_not_utf8",
        lambda u, t: pa.table(
            {"user_id": u, "history": pa.array([[b"\xff\xfe"]] * len(u), pa.list_(pa.binary()))}
        ),
    ),
    TableKind(
        "group_float_nan",
        lambda u, t: pa.table({"user_id": u, "history": _hist(t), "group_id": [float("nan")] * len(u)}),
    ),
    TableKind(
        "duplicate_columns",
        lambda u, t: pa.Table.from_arrays(
            [pa.array(u), pa.array(_hist(t)), pa.array(u)], names=["user_id", "history", "user_id"]
        ),
    ),
]
