"""LaMP-7 (personalized tweet paraphrasing) data: questions, gold outputs, user records.

The LaMP license (CC BY-NC-SA 4.0) does not allow shipping the data inside the project, so it is
read from a path: by default ``../shared/data/lamp/lamp7`` relative to the repository root,
overridable with the environment variable ``CHAMELEON_LAMP7_DIR`` or an explicit argument.

File layouts (the official LaMP JSON layout):

- questions: ``[{"id": str, "input": str, "profile": [{"id": ..., "text": str}, ...]}, ...]``
- outputs:   ``{"task": "LaMP_7", "golds": [{"id": str, "output": str}, ...]}``

The project's rule for experiments: the first :data:`N_TUNING` questions in file order are for
tuning (layers, scales, prompts), the rest are for reporting
(:func:`chameleon.evaluation.split.select_users` enforces it).

The official metrics live in :mod:`chameleon.evaluation.metrics`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# The data layer's converter of a LaMP question (what a job reading a LaMP questions file runs).
from chameleon.core.prompts import PARAPHRASE_TWEET
from chameleon.data.schema import lamp_record
from chameleon.evaluation.names import LAMP7_QUERY_TEMPLATE

__all__ = [
    "LAMP7_DIR_ENV",
    "LAMP7_PROMPT",
    "LAMP7_QUERY_TEMPLATE",
    "N_TUNING",
    "Lamp7Files",
    "LampQuestion",
    "default_lamp7_dir",
    "extract_lamp7_tweet",
    "find_lamp7_files",
    "lamp_to_user_records",
    "load_lamp7",
    "load_lamp_outputs",
    "load_lamp_questions",
    "profile_texts",
]

LAMP7_DIR_ENV = "CHAMELEON_LAMP7_DIR"
"""Environment variable that overrides the default LaMP-7 directory."""

N_TUNING = 500
"""Number of questions (file order) reserved for tuning; the rest are for reporting."""

LAMP7_PROMPT = PARAPHRASE_TWEET
"""The LaMP-7 input prefix, verbatim from the dataset (every dev input is this prefix + the tweet)."""

"""The query a profile tweet answers: the LaMP-7 input built from it (``str.format(text=...)``)."""


@dataclass
class LampQuestion:
    """One LaMP question: one user, with the user's profile (past items)."""

    id: str
    input: str
    profile: list[dict] = field(default_factory=list)


class Lamp7Files(NamedTuple):
    """The resolved LaMP-7 question and gold-output files."""

    questions: Path
    outputs: Path


def _read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LaMP file not found: {p}")
    with p.open(encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e


def load_lamp_questions(path: str | os.PathLike[str]) -> list[LampQuestion]:
    """Read a LaMP questions file (a JSON list of ``{"id", "input", "profile"}``), in file order.

    Ids are returned as strings. Raises ``ValueError`` on a malformed question (with its position).
    """
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise ValueError(f"{path}: a LaMP questions file is a JSON list, got {type(raw).__name__}")
    out: list[LampQuestion] = []
    for i, q in enumerate(raw):
        if not isinstance(q, dict):
            raise ValueError(f"{path}: question {i} is not an object")
        missing = [k for k in ("id", "input") if k not in q]
        if missing:
            raise ValueError(f"{path}: question {i} lacks {', '.join(missing)}")
        profile = q.get("profile", [])
        if not isinstance(profile, list) or not all(isinstance(p, dict) for p in profile):
            raise ValueError(
                f"{path}: question {i} (id {q['id']!r}) has a profile that is not a list of objects"
            )
        if not isinstance(q["input"], str):
            raise ValueError(f"{path}: question {i} (id {q['id']!r}) has a non-string input")
        out.append(LampQuestion(id=str(q["id"]), input=q["input"], profile=profile))
    return out


def load_lamp_outputs(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a LaMP outputs file (``{"task": ..., "golds": [{"id", "output"}]}``) as ``{id: output}``.

    Outputs are returned verbatim (the metrics strip them). Raises ``ValueError`` on a malformed
    file or a duplicate id.
    """
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("golds"), list):
        raise ValueError(f"{path}: a LaMP outputs file is an object with a 'golds' list")
    out: dict[str, str] = {}
    for i, g in enumerate(raw["golds"]):
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise ValueError(f"{path}: gold {i} is not an object with 'id' and 'output'")
        gid = str(g["id"])
        if gid in out:
            raise ValueError(f"{path}: duplicate gold id {gid!r}")
        out[gid] = str(g["output"])
    return out


def default_lamp7_dir() -> Path:
    """``$CHAMELEON_LAMP7_DIR`` if set, else ``<repo root>/../shared/data/lamp/lamp7``."""
    env = os.environ.get(LAMP7_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]  # <repo>/chameleon/evaluation/lamp.py
    return (repo_root.parent / "shared" / "data" / "lamp" / "lamp7").resolve()


_QUESTION_NAMES = ("dev_questions.json", "dev_questions.reconstructed.json")
_OUTPUT_NAMES = ("dev_outputs.json", "dev_outputs.reconstructed.json")


def find_lamp7_files(dir: str | os.PathLike[str] | None = None) -> Lamp7Files:
    """Resolve the LaMP-7 dev question and output files in ``dir`` (default :func:`default_lamp7_dir`).

    The official names (``dev_questions.json``, ``dev_outputs.json``) win when present; otherwise the
    locally derived ``dev_questions.reconstructed.json`` / ``dev_outputs.reconstructed.json`` are used.
    Raises ``FileNotFoundError`` naming the directory and the names looked for.
    """
    d = Path(dir).expanduser() if dir is not None else default_lamp7_dir()
    if not d.is_dir():
        raise FileNotFoundError(
            f"LaMP-7 directory not found: {d} (set {LAMP7_DIR_ENV} or pass the directory explicitly)"
        )

    def pick(names: tuple[str, ...]) -> Path:
        for n in names:
            if (d / n).is_file():
                return d / n
        raise FileNotFoundError(f"none of {', '.join(names)} in {d}")

    return Lamp7Files(questions=pick(_QUESTION_NAMES), outputs=pick(_OUTPUT_NAMES))


def load_lamp7(dir: str | os.PathLike[str] | None = None) -> tuple[list[LampQuestion], dict[str, str]]:
    """Load LaMP-7 dev questions (file order) and gold outputs ``{id: output}`` from ``dir``."""
    files = find_lamp7_files(dir)
    return load_lamp_questions(files.questions), load_lamp_outputs(files.outputs)


_LAMP7_LOOSE = re.compile(r"^\s*paraphrase the following tweet[^:]*:\s?", flags=re.IGNORECASE)


def extract_lamp7_tweet(input: str) -> str:
    """The tweet inside a LaMP-7 input (what the ``copy`` baseline answers with).

    Removes the verbatim prefix :data:`LAMP7_PROMPT` (or, failing that, any
    ``"Paraphrase the following tweet ...:"`` prefix, case-insensitive) and strips surrounding
    whitespace. An input without such a prefix is returned stripped.
    """
    if input.startswith(LAMP7_PROMPT):
        return input[len(LAMP7_PROMPT) :].strip()
    return _LAMP7_LOOSE.sub("", input, count=1).strip()


def profile_texts(question: LampQuestion) -> list[str]:
    """The tweets of a question's profile, in profile order (``""`` for an item without text)."""
    return ["" if item.get("text") in (None, "") else str(item["text"]) for item in question.profile]


def lamp_to_user_records(questions: Sequence[LampQuestion]) -> list[dict]:
    """The project's user records for LaMP-7 questions, one per question (LaMP has one question
    per user), in input order: ``{"user_id": q.id, "history": [{"text": tweet, "input": None}],
    "query": q.input}``. Profile tweets have no inputs: the job fakes their queries
    (``synth.query_template`` = ``LAMP7_QUERY_TEMPLATE`` around a neutralized tweet).

    The conversion is the data layer's own (what a job reading a LaMP questions file runs).
    """
    return [lamp_record({"id": q.id, "input": q.input, "profile": q.profile}, None) for q in questions]
