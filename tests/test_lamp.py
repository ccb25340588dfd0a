"""Tests for chameleon.evaluation.lamp (and the split rule on real data): small hand-written fixtures,
plus the real LaMP-7 dev files when present.

The real data is read from ../shared/data/lamp/lamp7 (or $CHAMELEON_LAMP7_DIR); it is never copied
into the repository.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chameleon.data.schema import validate_records
from chameleon.evaluation import lamp
from chameleon.evaluation.lamp import (
    LAMP7_PROMPT,
    LAMP7_QUERY_TEMPLATE,
    LampQuestion,
    extract_lamp7_tweet,
    find_lamp7_files,
    lamp_to_user_records,
    load_lamp7,
    load_lamp_outputs,
    load_lamp_questions,
    profile_texts,
)
from chameleon.evaluation.split import select_users

REPO_ROOT = Path(__file__).resolve().parents[1]


def _real_dir() -> Path | None:
    try:
        find_lamp7_files()
    except FileNotFoundError:
        return None
    return lamp.default_lamp7_dir()


REAL_DIR = _real_dir()
needs_real = pytest.mark.skipif(
    REAL_DIR is None,
    reason=f"LaMP-7 dev data not found at {lamp.default_lamp7_dir()} (set {lamp.LAMP7_DIR_ENV})",
)

# ----------------------------------------------------------------------------- fixtures

QUESTIONS = [
    {
        "id": 10,
        "input": LAMP7_PROMPT + "I am so tired today.",
        "profile": [{"text": "omg so sleepy ", "id": "10_0"}, {"text": "coffee pls", "id": "10_1"}],
    },
    {
        "id": "11",
        "input": LAMP7_PROMPT + "Rain again.",
        "profile": [{"text": "rain rain go away", "id": "11_0"}],
    },
    {"id": "12", "input": LAMP7_PROMPT + "Hello world", "profile": []},
]
OUTPUTS = {
    "task": "LaMP_7",
    "golds": [
        {"id": "10", "output": "so tired "},
        {"id": 11, "output": "raining again"},
        {"id": "12", "output": "hi"},
    ],
}


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_load_questions_and_outputs(tmp_path):
    qs = load_lamp_questions(_write(tmp_path / "q.json", QUESTIONS))
    assert [q.id for q in qs] == ["10", "11", "12"]  # ids become strings, file order kept
    assert qs[0].input == LAMP7_PROMPT + "I am so tired today."
    assert qs[0].profile[0] == {"text": "omg so sleepy ", "id": "10_0"}
    assert qs[2].profile == []
    golds = load_lamp_outputs(_write(tmp_path / "o.json", OUTPUTS))
    assert golds == {"10": "so tired ", "11": "raining again", "12": "hi"}  # verbatim


@pytest.mark.parametrize(
    "bad",
    [
        {"not": "a list"},
        [{"input": "x", "profile": []}],  # no id
        [{"id": "1", "input": "x", "profile": ["a string"]}],
        [{"id": "1", "input": 3, "profile": []}],
    ],
)
def test_load_questions_rejects_malformed(tmp_path, bad):
    with pytest.raises(ValueError):
        load_lamp_questions(_write(tmp_path / "q.json", bad))


def test_load_outputs_rejects_malformed_and_duplicates(tmp_path):
    with pytest.raises(ValueError):
        load_lamp_outputs(_write(tmp_path / "o.json", [{"id": "1", "output": "x"}]))
    with pytest.raises(ValueError, match="duplicate"):
        load_lamp_outputs(
            _write(tmp_path / "o.json", {"golds": [{"id": "1", "output": "a"}, {"id": 1, "output": "b"}]})
        )
    with pytest.raises(FileNotFoundError):
        load_lamp_outputs(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_lamp_outputs(tmp_path / "broken.json")


def test_find_files_names_and_env_override(tmp_path, monkeypatch):
    d = tmp_path / "lamp7"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="dev_questions"):
        find_lamp7_files(d)
    _write(d / "dev_questions.reconstructed.json", QUESTIONS)
    _write(d / "dev_outputs.reconstructed.json", OUTPUTS)
    files = find_lamp7_files(d)
    assert files.questions.name == "dev_questions.reconstructed.json"
    assert files.outputs.name == "dev_outputs.reconstructed.json"
    # the official names win when present
    _write(d / "dev_questions.json", QUESTIONS)
    _write(d / "dev_outputs.json", OUTPUTS)
    assert find_lamp7_files(d) == (d / "dev_questions.json", d / "dev_outputs.json")
    # the environment variable moves the default
    monkeypatch.setenv(lamp.LAMP7_DIR_ENV, str(d))
    assert lamp.default_lamp7_dir() == d
    questions, golds = load_lamp7()
    assert len(questions) == 3 and set(golds) == {"10", "11", "12"}
    with pytest.raises(FileNotFoundError, match=lamp.LAMP7_DIR_ENV):
        find_lamp7_files(tmp_path / "nowhere")


def test_default_dir_is_shared_next_to_repo(monkeypatch):
    monkeypatch.delenv(lamp.LAMP7_DIR_ENV, raising=False)
    assert lamp.default_lamp7_dir() == (REPO_ROOT.parent / "shared" / "data" / "lamp" / "lamp7").resolve()


def test_lamp7_query_template():
    assert (
        LAMP7_QUERY_TEMPLATE
        == "Paraphrase the following tweet without any explanation before or after it: {text}"
    )
    assert LAMP7_QUERY_TEMPLATE.format(text="hi there") == LAMP7_PROMPT + "hi there"


def test_profile_texts_keeps_order_and_empty_items():
    q = LampQuestion(
        id="1",
        input="x",
        profile=[{"text": "a b", "id": "1"}, {"text": "", "id": "2"}, {"id": "3"}, {"text": "c"}],
    )
    assert profile_texts(q) == ["a b", "", "", "c"]


def test_records_from_fixture():
    qs = [LampQuestion(id=str(q["id"]), input=q["input"], profile=q["profile"]) for q in QUESTIONS]
    recs = lamp_to_user_records(qs)
    assert recs[0] == {
        "user_id": "10",
        "history": [
            {"text": "omg so sleepy ", "input": None},  # profile tweets have no query: the job fakes it
            {"text": "coffee pls", "input": None},
        ],
        "query": LAMP7_PROMPT + "I am so tired today.",
    }
    assert recs[2]["history"] == []
    assert profile_texts(qs[0]) == ["omg so sleepy ", "coffee pls"]


def test_records_agree_with_the_data_layer():
    """The evaluation's users file and a LaMP questions file read by the job give the same users."""
    qs = [LampQuestion(id=str(q["id"]), input=q["input"], profile=q["profile"]) for q in QUESTIONS]
    from_records, _ = validate_records(lamp_to_user_records(qs))
    from_lamp, _ = validate_records(QUESTIONS)
    assert from_records == from_lamp and [u.user_id for u in from_records] == [
        "10",
        "11",
    ]  # "12" has no history
    # The job wraps a tweet without a query in the task's template.
    assert from_records[0].queries(LAMP7_QUERY_TEMPLATE) == [
        LAMP7_PROMPT + "omg so sleepy ",
        LAMP7_PROMPT + "coffee pls",
    ]


def test_split_rule_small():
    tune, report = select_users(list(range(7)), "0:3", "3:7", n_tuning=3)
    assert tune == [0, 1, 2] and report == [3, 4, 5, 6]
    tune, report = select_users(list(range(7)), "0:7", None, n_tuning=10)
    assert tune == list(range(7)) and report == []
    with pytest.raises(ValueError, match="split rule"):
        select_users(list(range(7)), "0:7", None, n_tuning=3)
    with pytest.raises(ValueError):
        select_users([1], "0:1", None, n_tuning=-1)


@pytest.mark.parametrize(
    ("inp", "tweet"),
    [
        (LAMP7_PROMPT + "hello there ", "hello there"),
        ("paraphrase the following tweet without any explanation: yo: what's up", "yo: what's up"),
        ("  plain tweet  ", "plain tweet"),
    ],
)
def test_extract_lamp7_tweet_fixture(inp, tweet):
    assert extract_lamp7_tweet(inp) == tweet


# ----------------------------------------------------------------------------- real LaMP-7 dev


@pytest.fixture(scope="module")
def real():
    return load_lamp7(REAL_DIR)


@needs_real
def test_real_counts_ids_and_golds(real):
    questions, golds = real
    assert len(questions) == 1500
    ids = [q.id for q in questions]
    assert len(set(ids)) == 1500
    assert ids[0] == "610" and ids[-1] == "611499"  # "61" + row number, file order
    assert all(q.id in golds for q in questions)
    assert set(golds) == set(ids)
    sizes = [len(q.profile) for q in questions]
    assert (min(sizes), max(sizes), sum(sizes)) == (9, 226, 26464)  # from lamp7/SOURCES.md


@needs_real
def test_real_split_rule(real):
    questions, _ = real
    tune, report = select_users(questions, "0:500", "500:1500")
    assert len(tune) == 500 and len(report) == 1000
    assert tune[0].id == "610" and tune[-1].id == "61499"
    assert report[0].id == "61500" and report[-1].id == "611499"
    assert not {q.id for q in tune} & {q.id for q in report}
    assert tune + report == questions


@needs_real
def test_real_extract_tweet(real):
    questions, _ = real
    assert extract_lamp7_tweet(questions[0].input) == (
        "Although I have a lot to do today, I am currently feeling unoccupied."
    )
    assert (
        extract_lamp7_tweet(questions[1].input) == "I wish Torchwood Children of Earth was currently airing."
    )
    for q in questions:
        assert q.input.startswith(LAMP7_PROMPT)
        tweet = extract_lamp7_tweet(q.input)
        assert tweet and not tweet.startswith("Paraphrase")
        assert q.input[len(LAMP7_PROMPT) :].strip() == tweet


@needs_real
def test_real_user_records(real):
    questions, _ = real
    recs = lamp_to_user_records(questions[:50])
    for q, r in zip(questions[:50], recs, strict=True):
        assert r["user_id"] == q.id and r["query"] == q.input
        assert len(r["history"]) == len(q.profile)
        for h, item in zip(r["history"], q.profile, strict=True):
            assert h["text"] == item["text"]
            assert h["input"] is None


@needs_real
def test_real_copy_baseline_matches_reference(real):
    """The copy baseline on reporting users 500..599 reproduces the published LaMP-7 copy figure."""
    from chameleon.evaluation.metrics import bootstrap_ci, rouge_per_item

    questions, golds = real
    _, users = select_users(questions, None, "500:600")
    per = rouge_per_item([extract_lamp7_tweet(q.input) for q in users], [golds[q.id] for q in users])
    ci1, cil = bootstrap_ci(per["rouge1"]), bootstrap_ci(per["rougeL"])
    assert round(ci1.mean, 3) == 0.483
    assert round(cil.mean, 3) == 0.428
    # the reference reports [0.458, 0.511] / [0.405, 0.454]; seed 0 gives these to 3 decimals, the
    # tolerance allows for another resampling scheme
    assert ci1.low == pytest.approx(0.458, abs=0.005) and ci1.high == pytest.approx(0.511, abs=0.005)
    assert cil.low == pytest.approx(0.405, abs=0.005) and cil.high == pytest.approx(0.454, abs=0.005)


def test_only_the_lamp_tests_read_the_real_data():
    """Tests that do not study LaMP-7 use users the project writes (the demo's example users,
    synthetic ones), so `make test` passes on a clone without the data beside it."""
    here = Path(__file__).resolve()
    readers = [
        p.name
        for p in here.parent.glob("test_*.py")
        if p != here and re.search(r"\b(load_lamp7|default_lamp7_dir|find_lamp7_files)\(", p.read_text())
    ]
    assert not readers, f"read LaMP-7 outside test_lamp.py (skip them without the data): {readers}"
