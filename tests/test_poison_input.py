"""Poison input never stops the job: every record ends accepted or in rejects.jsonl with a reason.

The malformed kinds live in `chameleon.dev.poison` (shared with jobs/bench/job_integrity.py);
hypothesis mixes them with good records in JSONL, LaMP JSON lists and Parquet files of odd schemas,
and the job's own first step (`job.run.begin_run`: read, validate, write rejects) must account
for every one of them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chameleon.config import ChameleonConfig
from chameleon.data.inputs import loads_strict, parse_json_list, parse_jsonl, prepare_input
from chameleon.data.layout import REJECTS
from chameleon.data.schema import json_safe
from chameleon.data.storage import LocalStore
from chameleon.dev.poison import GOOD_KINDS, MALFORMED_KINDS, PARQUET_KINDS
from chameleon.job.run import begin_run

CFG = ChameleonConfig().with_overrides({"job.users_per_partition": 4})
KINDS = GOOD_KINDS + MALFORMED_KINDS
# The model as the job spec knows it (`job.spec.model_identity`); these tests map nobody.
MODEL = {"name_or_path": "tiny-llama", "revision": None, "config_sha256": "-", "num_layers": 4}
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=20
).filter(lambda s: s.strip() and "\ufffd" not in s)


def _run_and_check(path: Path, expected_ids: set[str], n_records: int) -> None:
    """begin_run on the file: counts add up, the right users are accepted, every reject has a
    reason, and rejects.jsonl is strict UTF-8 JSON with one line per reject."""
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        plan = begin_run(str(path), store, "poison-run", CFG, MODEL)
        prepared = plan.prepared
        assert prepared.n_input == n_records
        assert len(prepared.users) + len(prepared.rejects) == n_records  # none lost
        assert {u.user_id for u in prepared.users} == expected_ids
        assert all(r.reason for r in prepared.rejects)
        lines = plan.run_writer.get_bytes(REJECTS).decode("utf-8").splitlines()
        rows = [loads_strict(line) for line in lines]
        assert len(rows) == len(prepared.rejects) and all(row["reason"] for row in rows)
        assert sum(len(p) for p in plan.partitions) == len(expected_ids)


def test_every_malformed_kind_is_rejected_with_a_reason_and_good_ones_kept(tmp_path):
    assert len(MALFORMED_KINDS) >= 25 and len({k.name for k in KINDS}) == len(KINDS)
    lines = [k.make(f"u{i}", "hello") for i, k in enumerate(KINDS)]
    good = {f"u{i}" for i, k in enumerate(KINDS) if k.accepted}
    path = tmp_path / "users.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM costs nobody their record
    _run_and_check(path, good, len(lines))
    rejects = prepare_input(str(path), CFG).rejects
    by_index = {r.index: r.reason for r in rejects}
    # The crashes of issue 11, each now a reason on its own record.
    names = [k.name for k in KINDS]
    for name, reason in {
        "huge_int_user_id": "4300 digits",
        "deep_nesting": "RecursionError",
        "lamp_profile_number": "profile must be a list",
        "lone_surrogate_text": "lone surrogate",
        "duplicate_keys": "duplicate key",
        "group_nan": "NaN",
        "oversized": "limit",
    }.items():
        assert reason in by_index[names.index(name)], (name, by_index[names.index(name)])


@FAST
@given(
    records=st.lists(st.tuples(st.sampled_from(KINDS), texts), min_size=1, max_size=25),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    bom=st.booleans(),
    duplicate=st.booleans(),
)
def test_jsonl_mixtures_lose_nothing(records, newline, bom, duplicate):
    lines = [kind.make(f"u{i}", text) for i, (kind, text) in enumerate(records)]
    good = {f"u{i}" for i, (kind, _) in enumerate(records) if kind.accepted}
    lines.append(GOOD_KINDS[0].make("anchor", "always one good user"))
    good.add("anchor")
    if duplicate:  # every copy of a duplicated id is rejected: which one is right is unknown
        lines.append(GOOD_KINDS[1].make("anchor", "again"))
        lines.append(GOOD_KINDS[0].make("anchor2", "kept"))
        good = (good - {"anchor"}) | {"anchor2"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "users.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines) + newline)
        _run_and_check(path, good, len(lines))


@FAST
@given(records=st.lists(st.tuples(st.sampled_from([k for k in KINDS if k.json_element]), texts), max_size=25))
def test_lamp_json_lists_lose_nothing(records):
    elements = [kind.make(f"q{i}", text) for i, (kind, text) in enumerate(records)]
    elements.append(GOOD_KINDS[3].make("anchor", "one good question"))
    good = {f"q{i}" for i, (kind, _) in enumerate(records) if kind.accepted} | {"anchor"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "questions.json"
        path.write_bytes(b"[\n" + b",\n".join(elements) + b"\n]")
        _run_and_check(path, good, len(elements))


@FAST
@given(kind=st.sampled_from(PARQUET_KINDS), n=st.integers(1, 5), text=texts)
def test_parquet_files_of_odd_schemas_lose_nothing(kind, n, text):
    uids = [f"p{i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "users.parquet"
        pq.write_table(kind.make(uids, [f"{text} {i}" for i in range(n)]), path)
        if kind.accepted:
            _run_and_check(path, set(uids), n)
        else:  # no user accepted: the job stops with a clear error, every row still accounted
            prepared = prepare_input(str(path), CFG)
            assert prepared.n_input == n and not prepared.users and len(prepared.rejects) == n
            with pytest.raises(ValueError, match=f"no valid user records \\({n} rejected\\)"):
                begin_run(str(path), LocalStore(tmp), "poison-run", CFG, MODEL)


def test_line_endings_bom_and_unreadable_placeholders():
    assert len(parse_jsonl(b'\xef\xbb\xbf{"a": 1}\r{"a": 2}\r\n\n{"a": 3}')) == 3
    bad = parse_jsonl(b'{"a": 1, "a": 2}\n' + b"x" * 2000, max_record_bytes=1024)
    assert "duplicate key" in bad[0]["_unreadable"] and "limit 1024" in bad[1]["_unreadable"]
    # One bad element of a JSON list leaves the others readable.
    records = parse_json_list(b'[{"id": 1}, {"id": ' + b"9" * 5000 + b'}, {"id": "x,]"}]')
    assert records[0] == {"id": 1} and "_unreadable" in records[1] and records[2] == {"id": "x,]"}
    with pytest.raises(ValueError, match="JSON list"):
        parse_json_list(b'{"not": "a list"}')


@pytest.mark.parametrize(
    "value",
    ["a\ud800b", b"\xff\xfe", 10**5000, float("nan"), [[[[[[[[[[1]]]]]]]]]], {"k": object()}, "x" * 10**5],
    ids=["surrogate", "bytes", "huge_int", "nan", "deep", "object", "long"],
)
def test_json_safe_always_encodes(value):
    import json

    json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False).encode("utf-8")
