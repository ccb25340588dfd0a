"""Find users' bytes in a store: which objects of which runs hold them, and which rows are theirs.

    match = UserMatch(["alice", "u17"])
    held = scan_runs(store, match)        # {run_id: RunHolding}, every run, manifest or not
    match.rejects_of(row)                 # the given ids a `rejects.jsonl` row belongs to

The rule for an id (documented in cluster/README.md, "Forget a user"). Each id is matched as given
and in its normalized form: Unicode NFKC, control and format characters (zero-width spaces, byte
order marks) removed, surrounding whitespace stripped. So forgetting `alice` also finds the
reject of a record whose id was `"alice "` (it failed validation because of the space), and
forgetting `"alice "` also finds `alice`. Case is kept (`Alice` is another user). An accepted
user's rows (pairs, profiles, failures, assignments, user shards, done records) hold valid ids
only and match exactly. A reject matches by its PARSED id: the reject's `user_id`, else its
record's `user_id` or `id` (a number counts as its decimal text); a reject whose record has no id
(a line that was not JSON, a JSON value that is not an object) matches when its text holds the
id as a token: not inside a longer id (`user` is not found in `user_id`, `user-2` or `user.1`).
A row whose id is someone else's never matches, whatever its text mentions.

Every object of a run is read: the manifest's files, every attempt folder (abandoned attempts
too), done records, and runs without a manifest (a job in progress, abandoned, or a deletion that
was interrupted). Files of unknown kind are searched as text for the ids as tokens.
"""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from chameleon.data.artifacts import MANIFEST, RUNS
from chameleon.data.ids import is_valid_id
from chameleon.data.storage import Store, read_parquet_bytes

UNREADABLE = "_unreadable"  # the placeholder record of `chameleon.data.inputs` (schema.UNREADABLE)
_ID_FIELDS = ("user_id", "user_ids")
# An id inside a longer one: a word character or one of `_ : @ -` next to it, or a `.` joining it
# to more word characters.
_TOKEN = r"(?<![\w:@-])(?<!\w\.){}(?![\w:@-])(?!\.\w)"
_RAW_ID = re.compile(r'"(?:user_id|id)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


def normalize_id(value: str) -> str:
    """NFKC, without control or format characters, without surrounding whitespace."""
    text = unicodedata.normalize("NFKC", value)
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf")).strip()


class UserMatch:
    """The users being looked for, and which of them a stored value, row or text belongs to."""

    def __init__(self, user_ids: Iterable[str]) -> None:
        self.given = sorted({u for u in user_ids if isinstance(u, str)})
        blank = [u for u in self.given if not normalize_id(u)]
        if blank or not self.given:
            raise ValueError(
                f"no user ids to look for in {blank}: an id must not be empty or only whitespace"
            )
        self._forms: dict[str, set[str]] = {}
        for uid in self.given:
            for form in (uid, normalize_id(uid)):
                self._forms.setdefault(form, set()).add(uid)
        self.valid_ids = sorted(f for f in self._forms if is_valid_id(f))
        """The forms an accepted user's rows can hold (valid ids): matched exactly."""
        self._tokens = [(re.compile(_TOKEN.format(re.escape(f))), ids) for f, ids in self._forms.items()]

    def of_id(self, value: Any) -> set[str]:
        """The given ids that `value` (a parsed id) is, as given or normalized."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return set()
        return self._forms.get(value, set()) | self._forms.get(normalize_id(value), set())

    def of_text(self, text: str) -> set[str]:
        """The given ids that `text` holds as a token."""
        found: set[str] = set()
        for pattern, ids in self._tokens:
            if not ids <= found and pattern.search(text):
                found |= ids
        return found

    def rejects_of(self, row: Any) -> set[str]:
        """The given ids a `rejects.jsonl` row belongs to (see the module doc)."""
        if not isinstance(row, dict):
            return self.of_text(json.dumps(row, ensure_ascii=False))
        record = row.get("record")
        parsed = row.get("user_id")
        if parsed is None and isinstance(record, dict):
            parsed = record.get("user_id", record.get("id"))
            if parsed is None and UNREADABLE in record:
                return self._of_unreadable(str(record.get("raw", "")))
        if isinstance(parsed, str) or (isinstance(parsed, int) and not isinstance(parsed, bool)):
            return self.of_id(parsed)
        return self.of_text(json.dumps(record, ensure_ascii=False))

    def _of_unreadable(self, raw: str) -> set[str]:
        """A line that could not be decoded: its id when one can still be read, else its text."""
        m = _RAW_ID.search(raw)
        if m:
            try:
                return self.of_id(json.loads(m.group(1)))
            except ValueError:
                pass
        return self.of_text(raw)

    def drop_rows(self, table: pa.Table) -> pa.Table:
        """`table` without the rows whose `user_id` is one of the users."""
        mask = pc.is_in(table.column("user_id"), value_set=pa.array(self.valid_ids, pa.string()))
        return table.filter(pc.invert(pc.fill_null(mask, False)))

    def keeps(self, row: Any) -> bool:
        """Whether a failures or done-record row (`user_id`) belongs to none of the users."""
        return not (isinstance(row, dict) and self.of_id(row.get("user_id")))


# -- one object --------------------------------------------------------------------------------


def _of_json_ids(obj: Any, match: UserMatch) -> set[str]:
    """Ids in the `user_id` / `user_ids` fields anywhere in a JSON value."""
    found: set[str] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k in _ID_FIELDS:
                    for value in v if isinstance(v, list) else [v]:
                        found |= match.of_id(value)
                else:
                    stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _of_text(data: bytes, match: UserMatch) -> set[str]:
    return match.of_text(data.decode("utf-8", "replace"))


def _of_parquet(data: bytes, match: UserMatch) -> set[str]:
    table = read_parquet_bytes(data)
    if "user_id" not in table.column_names:
        return match.of_text(json.dumps(table.to_pylist(), default=repr, ensure_ascii=False))
    held = pc.unique(table.column("user_id")).to_pylist()
    return set().union(*(match.of_id(u) for u in held))


def _of_jsonl(data: bytes, match: UserMatch, rejects: bool) -> set[str]:
    found: set[str] = set()
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            found |= match.of_text(line)
            continue
        found |= match.rejects_of(row) if rejects else _of_json_ids(row, match)
    return found


def _of_safetensors(data: bytes, match: UserMatch) -> set[str]:
    if len(data) < 8:
        return _of_text(data, match)
    (n,) = struct.unpack("<Q", data[:8])
    try:
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except ValueError:
        return _of_text(data, match)
    found: set[str] = set()
    for key in _ID_FIELDS:
        if key in meta:
            try:
                found |= _of_json_ids({key: json.loads(meta[key])}, match)
            except ValueError:
                found |= match.of_text(str(meta[key]))
    return found


def ids_in_object(key: str, data: bytes, match: UserMatch) -> set[str]:
    """The given ids an object of a run holds (by its kind: Parquet `user_id` columns, JSONL
    rows, JSON and safetensors `user_id(s)` fields; unknown kinds as text)."""
    name = key.rsplit("/", 1)[-1]
    try:
        if name.endswith(".parquet"):
            return _of_parquet(data, match)
        if name.endswith(".jsonl"):
            return _of_jsonl(data, match, rejects=name.startswith("rejects") or "rejects/" in key)
        if name.endswith(".json"):
            return _of_json_ids(json.loads(data), match)
        if name.endswith(".safetensors"):
            return _of_safetensors(data, match)
    except Exception:  # a damaged object: fall back to its text
        pass
    return _of_text(data, match)


# -- every run of a store ------------------------------------------------------------------------


@dataclass
class RunHolding:
    run_id: str
    committed: bool
    users: set[str] = field(default_factory=set)
    """The given ids found."""
    keys: list[str] = field(default_factory=list)
    """The run's objects (below `runs/<run_id>/`) that hold them."""


def run_ids(store: Store) -> tuple[list[str], list[str]]:
    """(committed run ids, run ids without a manifest), sorted."""
    runs: dict[str, bool] = {}
    for key in store.list(f"{RUNS}/"):
        parts = key.split("/")
        if len(parts) >= 3:
            runs[parts[1]] = runs.get(parts[1], False) or parts[2] == MANIFEST
    return sorted(r for r, c in runs.items() if c), sorted(r for r, c in runs.items() if not c)


def scan_runs(store: Store, match: UserMatch, only: Sequence[str] | None = None) -> dict[str, RunHolding]:
    """{run id: what it holds} for every run (or the `only` ones) holding any of the users."""
    committed, incomplete = run_ids(store)
    out: dict[str, RunHolding] = {}
    for run_id in [*committed, *incomplete]:
        if only is not None and run_id not in only:
            continue
        holding = RunHolding(run_id, run_id in committed)
        prefix = f"{RUNS}/{run_id}/"
        for key in store.list(prefix):
            try:
                data = store.get_bytes(key)
            except FileNotFoundError:  # deleted meanwhile
                continue
            found = ids_in_object(key, data, match)
            if found:
                holding.users |= found
                holding.keys.append(key[len(prefix) :])
        if holding.users:
            out[run_id] = holding
    return out
