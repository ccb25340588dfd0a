"""User records: accepted shapes, and a clear reason for every reject."""

from __future__ import annotations

import pytest

from chameleon.data.inputs import parse_jsonl
from chameleon.data.schema import InvalidRecord, parse_record, validate_records


def test_accepted_shapes():
    rec = parse_record(
        {
            "user_id": "u1",
            "history": ["plain text", {"text": "t", "input": "q"}],
            "query": "Q",
            "group_id": "g1",
        }
    )
    assert rec.user_id == "u1" and rec.history[0].text == "plain text" and rec.history[1].input == "q"
    assert rec.queries("Say: {text}") == ["Say: plain text", "q"] and rec.group_id == "g1"
    lamp = parse_record(
        {"id": 610, "input": "Paraphrase: x", "profile": [{"text": "a", "id": "610_0"}]},
        query_template="P: {text}",
    )
    assert lamp.user_id == "610" and lamp.history[0].input == "P: a" and lamp.query == "Paraphrase: x"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ([1, 2], "must be an object"),
        ({"history": ["x"]}, "missing user_id"),
        ({"user_id": "a/../b", "history": ["x"]}, "user_id must be"),
        ({"user_id": "ok\n", "history": ["x"]}, "user_id must be"),
        ({"user_id": "u", "history": []}, "history is empty"),
        ({"user_id": "u"}, "missing history"),
        ({"user_id": "u", "history": [{"text": 3}]}, "must be a string"),
        ({"user_id": "u", "history": ["  "]}, "is empty"),
        ({"user_id": "u", "history": ["bad \ufffd"]}, "undecodable"),
        ({"user_id": "u", "history": [b"\xff\xfe"]}, "UTF-8"),
        ({"user_id": "u", "history": ["x" * 5000]}, "limit 4000"),
        ({"user_id": "u", "history": ["x"] * 600}, "limit 512"),
    ],
)
def test_rejects_carry_a_reason(raw, reason):
    with pytest.raises(InvalidRecord, match=reason):
        parse_record(raw)


def test_validate_keeps_order_rejects_duplicates_and_unreadable_lines():
    raw = parse_jsonl(
        b'{"user_id": "a", "history": ["x"]}\n{oops\n{"user_id": "a", "history": ["y"]}\n{"user_id": "b", "history": ["z"]}\n'
    )
    users, rejects = validate_records(raw)
    assert [u.user_id for u in users] == ["b"]
    assert [r.index for r in rejects] == [0, 1, 2]
    assert "duplicate" in rejects[0].reason and "unreadable" in rejects[1].reason
    assert rejects[0].record is not None  # nothing is lost: the record travels with its reason
