"""LaMP data IO, generic over the seven LaMP tasks; LaMP-7 (tweet paraphrasing) is the real case.

The LaMP license (CC BY-NC-SA 4.0) does not allow shipping the data inside the project, so it is
read from a path: by default ``../shared/data/lamp/lamp7`` relative to the repository root,
overridable with the environment variable ``CHAMELEON_LAMP7_DIR`` or an explicit argument.

File layouts (the official LaMP JSON layout):

- questions: ``[{"id": str, "input": str, "profile": [{"id": ..., <task fields>}, ...]}, ...]``
- outputs:   ``{"task": "LaMP_7", "golds": [{"id": str, "output": str}, ...]}``

The project's rule for experiments: the first 500 questions in file order are for tuning
(layers, scales, prompts), the rest are for reporting. Never tune on reporting users
(:func:`split_tuning_reporting`).

The official metrics live in :mod:`chameleon.metrics`. This module does not import Ray.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

__all__ = [
    "LAMP7_DIR_ENV",
    "LAMP7_PROMPT",
    "LAMP2_TAGS",
    "LAMP_TASKS",
    "LampQuestion",
    "LampTask",
    "Lamp7Files",
    "N_TUNING",
    "default_lamp7_dir",
    "extract_lamp7_tweet",
    "find_lamp7_files",
    "get_task",
    "lamp_to_user_records",
    "load_lamp7",
    "load_lamp_outputs",
    "load_lamp_questions",
    "profile_texts",
    "split_tuning_reporting",
]

LAMP7_DIR_ENV = "CHAMELEON_LAMP7_DIR"
"""Environment variable that overrides the default LaMP-7 directory."""

N_TUNING = 500
"""Number of questions (file order) reserved for tuning; the rest are for reporting."""

LAMP7_PROMPT = "Paraphrase the following tweet without any explanation before or after it: "
"""The LaMP-7 input prefix, verbatim from the dataset (every dev input is this prefix + the tweet)."""

LAMP2_TAGS: tuple[str, ...] = (
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
)
"""The 15 LaMP-2 (movie tagging) labels, in LaMP's order."""

MetricKind = Literal["classification", "rating", "generation"]


@dataclass(frozen=True)
class LampTask:
    """How one LaMP task's profile items are read and turned into queries.

    ``query_template`` builds a query from one profile item with ``str.format(**item)``, following the
    task's own LaMP input string, so that a user's past items become queries of the same form as
    the test question (the inputs of selected history items are the queries for synthetic pairs).
    """

    name: str
    """LaMP task name, as in the outputs file's ``task`` field (``"LaMP_7"``)."""
    text_fields: tuple[str, ...]
    """Profile item fields that make the item's text (joined with a space, missing ones skipped)."""
    query_template: str
    """Template applied to a profile item (``str.format(**item)``) to build the query it answers."""
    output_field: str
    """The profile item field that is the user's own answer to ``query_template`` for that item."""
    metric: MetricKind
    """``classification`` (accuracy, macro-F1), ``rating`` (MAE, RMSE) or ``generation`` (ROUGE-1/L)."""
    labels: tuple[str, ...] | None = None
    """The label list of a classification task (exact-string matched by the evaluator)."""
    note: str = field(default="", compare=False)
    """Where the template comes from and how sure that is."""

    def item_text(self, item: dict[str, Any]) -> str:
        """The text of one profile item: its ``text_fields`` joined by a space."""
        parts = [str(item[f]) for f in self.text_fields if item.get(f) not in (None, "")]
        return " ".join(parts)

    def item_query(self, item: dict[str, Any]) -> str:
        """The query one profile item answers (``query_template`` applied to the item)."""
        try:
            return self.query_template.format(**item)
        except KeyError as e:
            raise ValueError(
                f"{self.name} profile item lacks field {e.args[0]!r} (item id {item.get('id')!r})"
            ) from e


_TAGS = "[" + ", ".join(LAMP2_TAGS) + "]"

LAMP_TASKS: dict[str, LampTask] = {
    "LaMP_1": LampTask(
        name="LaMP_1",
        text_fields=("title", "abstract"),
        # The LaMP-1 input needs two candidate references, which a profile item does not have; a
        # profile item is a paper the user wrote, so its query is the LaMP-5 title question.
        query_template="Generate a title for the following abstract of a paper: {abstract}",
        output_field="title",
        metric="classification",
        labels=("[1]", "[2]"),
        note="LaMP-1 input cannot be built from one item; uses the LaMP-5 input string (paraphrased notes)",
    ),
    "LaMP_2": LampTask(
        name="LaMP_2",
        text_fields=("description",),
        query_template=(
            "Which tag does this movie relate to among the following tags? Just answer with the tag name "
            "without further explanation. tags: " + _TAGS + " description: {description}"
        ),
        output_field="tag",
        metric="classification",
        labels=LAMP2_TAGS,
        note="LaMP-2 (movie tagging) input string, from method-notes 4.1 (paraphrased there)",
    ),
    "LaMP_3": LampTask(
        name="LaMP_3",
        text_fields=("text",),
        query_template=(
            "What is the score of the following review on a scale of 1 to 5? just answer with "
            "1, 2, 3, 4, or 5 without further explanation. review: {text}"
        ),
        output_field="score",
        metric="rating",
        labels=("1", "2", "3", "4", "5"),
        note="LaMP-3 input string, from method-notes 4.1 (paraphrased there)",
    ),
    "LaMP_4": LampTask(
        name="LaMP_4",
        text_fields=("title", "text"),
        query_template="Generate a headline for the following article: {text}",
        output_field="title",
        metric="generation",
        note="LaMP-4 input string, from method-notes 4.1 (paraphrased there)",
    ),
    "LaMP_5": LampTask(
        name="LaMP_5",
        text_fields=("title", "abstract"),
        query_template="Generate a title for the following abstract of a paper: {abstract}",
        output_field="title",
        metric="generation",
        note="LaMP-5 input string, from method-notes 4.1 (paraphrased there)",
    ),
    "LaMP_6": LampTask(
        name="LaMP_6",
        text_fields=("title", "text"),
        query_template="Generate a subject for the following email: {text}",
        output_field="title",
        metric="generation",
        note="LaMP-6 data is private (Avocado, LDC); template by analogy with LaMP-4/5, unverified",
    ),
    "LaMP_7": LampTask(
        name="LaMP_7",
        text_fields=("text",),
        query_template=LAMP7_PROMPT + "{text}",
        output_field="text",
        metric="generation",
        note="verbatim LaMP-7 input string (every dev input starts with it)",
    ),
}
"""The seven LaMP tasks by name (``"LaMP_1"`` .. ``"LaMP_7"``)."""


def get_task(task: str | int) -> LampTask:
    """Look up a task by name (``"LaMP_7"``, ``"lamp7"``, ``"LaMP-7"``) or number (``7``)."""
    if isinstance(task, int) or (isinstance(task, str) and task.strip().isdigit()):
        key = f"LaMP_{int(task)}"
    else:
        m = re.fullmatch(r"\s*lamp[\s_-]*(\d)\s*", str(task), flags=re.IGNORECASE)
        key = f"LaMP_{m.group(1)}" if m else str(task)
    if key not in LAMP_TASKS:
        raise ValueError(f"unknown LaMP task {task!r}; known: {', '.join(LAMP_TASKS)}")
    return LAMP_TASKS[key]


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

    Outputs are returned verbatim (the evaluator strips them; :mod:`chameleon.metrics` does too).
    Raises ``ValueError`` on a malformed file or a duplicate id.
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
    repo_root = Path(__file__).resolve().parent.parent
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


def profile_texts(question: LampQuestion, task: str | int = "LaMP_7") -> list[str]:
    """The texts of a question's profile items, in profile order (task's ``text_fields`` joined)."""
    t = get_task(task)
    return [t.item_text(item) for item in question.profile]


def lamp_to_user_records(questions: Sequence[LampQuestion], task: str | int = "LaMP_7") -> list[dict]:
    """The project's user records (see :mod:`chameleon.schema`) for LaMP questions.

    ``{"user_id": q.id, "history": [{"text": item text, "input": task template applied to the item}],
    "query": q.input}``, one record per question (LaMP has one question per user), in input order.
    For LaMP-7 an item's text is the tweet and its input is the LaMP-7 paraphrase prompt on it.
    """
    t = get_task(task)
    return [
        {
            "user_id": q.id,
            "history": [{"text": t.item_text(item), "input": t.item_query(item)} for item in q.profile],
            "query": q.input,
        }
        for q in questions
    ]


T = TypeVar("T")


def split_tuning_reporting(questions: Sequence[T], n_tuning: int = N_TUNING) -> tuple[list[T], list[T]]:
    """Split into (tuning, reporting): the first ``n_tuning`` in file order, and the rest.

    The project's rule: tune (layers, scales, prompts) only on the tuning part; report only on the
    reporting part.
    """
    if n_tuning < 0:
        raise ValueError(f"n_tuning must be >= 0, got {n_tuning}")
    items = list(questions)
    return items[:n_tuning], items[n_tuning:]
