"""`chameleon forget` finds a user wherever their bytes are and never drops another user's rows:
hostile ids (`user`, `"alice "`, a line that is not JSON), every attempt folder, runs without a
manifest, and a rerun after a crash at any point. Real runs (random hidden states, the real
validator, reduce and publish) on a local directory and on SeaweedFS."""

from __future__ import annotations

import pytest

from chameleon.cli import main
from chameleon.data.artifacts import RunReader, latest_run_id
from chameleon.data.storage import LocalStore
from chameleon.data.user_scan import UserMatch, normalize_id
from chameleon.dev.forget_case import (
    FORGOTTEN,
    bytes_found,
    forgotten_needles,
    hide_everywhere,
    other_reject_markers,
    write_forget_case,
)
from chameleon.job.forget import forget_users, runs_holding

OTHERS = [f"user-{i}" for i in range(10)]


# -- the matching rule ---------------------------------------------------------------------------


def test_ids_match_as_given_and_normalized_never_by_substring():
    m = UserMatch(["user", "alice"])
    assert m.of_id("alice ") == {"alice"} and m.of_id("\u200balice\n") == {"alice"}
    assert m.of_id("Alice") == set() and m.of_id("user_id") == set() and m.of_id("user-2") == set()
    assert m.of_id(17) == set() and UserMatch(["17"]).of_id(17) == {"17"}
    assert UserMatch(["alice "]).of_id("alice") == {"alice "}  # the raw id, normalized
    assert normalize_id("\ufeff ａｌｉｃｅ\t") == "alice"
    # Text: whole tokens only.
    assert m.of_text("alice wrote this") == {"alice"}
    assert m.of_text("the user said") == {"user"} and m.of_text("the user.") == {"user"}
    assert m.of_text('"user_id": "bob", user-7, user.1, superuser, user@x') == set()
    with pytest.raises(ValueError, match="no user ids"):
        UserMatch(["  "])


def test_rejects_match_by_parsed_id_then_by_text():
    m = UserMatch(["user", "alice"])
    # Every reject row has the key `user_id`: a substring match would take them all.
    assert m.rejects_of({"user_id": "bob", "reason": "x", "record": {"user_id": "bob"}}) == set()
    assert m.rejects_of({"user_id": "alice ", "record": {"user_id": "alice "}}) == {"alice"}
    # Someone else's record that mentions alice stays.
    assert m.rejects_of({"user_id": "carol", "record": {"note": "met alice and the user"}}) == set()
    # A record with a non-string id: the record's id, parsed.
    assert UserMatch(["42"]).rejects_of({"user_id": None, "record": {"user_id": 42}}) == {"42"}
    unreadable = {"user_id": None, "record": {"_unreadable": "line 3: ...", "raw": "alice wrote {{{"}}
    assert m.rejects_of(unreadable) == {"alice"}
    broken = {"user_id": None, "record": {"_unreadable": "...", "raw": '{"user_id": "bob", "h": "alice'}}
    assert m.rejects_of(broken) == set()  # bob's broken line mentions alice: bob's
    broken_alice = {"user_id": None, "record": {"_unreadable": "...", "raw": '{"user_id": "alice", "h": "x'}}
    assert m.rejects_of(broken_alice) == {"alice"}


# -- a store -------------------------------------------------------------------------------------


def _store_with_every_hiding_place(store) -> None:
    hide_everywhere(store)
    assert latest_run_id(store) == "before"


def _check_clean(store, new_run: str) -> None:
    assert bytes_found(store, forgotten_needles()) == []  # forget_user_bytes_found = 0
    assert runs_holding(store, list(FORGOTTEN)) == {}
    reader = RunReader(store, new_run)
    rejects = reader.get_bytes("rejects.jsonl").decode()
    assert [m for m in other_reject_markers() if m not in rejects] == []  # other_rejects_dropped = 0
    assert sorted(reader.get_parquet("assignments.parquet").column("user_id").to_pylist()) == sorted(OTHERS)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_forget_removes_hostile_ids_from_every_object_of_every_run(backend, request, tmp_path):
    store = request.getfixturevalue(f"{backend}_store")
    _store_with_every_hiding_place(store)
    assert bytes_found(store, forgotten_needles())  # the scan sees them before
    holding = runs_holding(store, list(FORGOTTEN))
    assert {r: (h.committed, sorted(h.users)) for r, h in holding.items()} == {
        "abandoned": (False, ["alice", "user"]),
        "before": (True, ["alice", "user"]),
        "halfgone": (False, ["alice", "user"]),
    }
    assert any(k.startswith("attempts/19700101T000000") for k in holding["before"].keys)
    res = forget_users(store, list(FORGOTTEN), new_run="after", delete_old=True)
    assert res.new_run == "after" and res.moved_latest and latest_run_id(store) == "after"
    assert res.deleted == ["abandoned", "before", "halfgone"] and res.still_holding == []
    assert res.manifest.forget.model_dump() == {
        "source_run": "before",
        "users_removed": 2,
        "rejects_removed": 3,
    }
    assert res.manifest.counts.rejected == len(other_reject_markers())
    _check_clean(store, "after")
    # Idempotent: a second forget finds nothing, publishes nothing.
    keys = store.list()
    again = forget_users(store, list(FORGOTTEN), delete_old=True)
    assert again.new_run is None and again.deleted == [] and store.list() == keys


def test_forget_cli_lists_every_run_and_reports_what_is_left(tmp_path, capsys):
    store = LocalStore(tmp_path / "store")
    _store_with_every_hiding_place(store)
    assert main(["forget", "--user", "alice ", "--store", str(store.root), "--list"]) == 0
    out = capsys.readouterr().out
    assert "halfgone (no manifest: incomplete or half deleted): alice " in out and "3 runs hold" in out
    # Without --delete-old the old runs stay, and the CLI says so.
    assert main(["forget", "--user", "alice ", "--store", str(store.root), "--new-run-id", "after"]) == 0
    out = capsys.readouterr().out
    assert "still holding the users (pass --delete-old to delete them): abandoned, before, halfgone" in out
    assert main(["forget", "--user", "alice ", "--store", str(store.root), "--delete-old"]) == 0
    assert "no run of the store holds them now" in capsys.readouterr().out
    found = bytes_found(store, [b"zebraalice", b"zebraspaced", b"zebraunreadable", b"zebrabroken"])
    assert found == []
    assert list(runs_holding(store, ["user"])) == [latest_run_id(store)]  # `user` was not asked for


class CrashingStore(LocalStore):
    """A local store whose process "dies" (raises) at the n-th call of one kind."""

    def __init__(self, root, op: str, n: int, _left: list[int] | None = None) -> None:
        super().__init__(root)
        self.op, self.left = op, _left or [n]  # shared with child stores

    def child(self, prefix: str) -> CrashingStore:
        return CrashingStore(super().child(prefix).root, self.op, 0, self.left)

    def _tick(self, op: str) -> None:
        if op == self.op:
            self.left[0] -= 1
            if self.left[0] == 0:
                raise SystemExit(f"crash at {op}")

    def delete(self, key: str) -> None:
        self._tick("delete")
        super().delete(key)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self._tick("put")
        super().put_bytes(key, data, if_absent=if_absent)


@pytest.mark.parametrize(("op", "n"), [("put", 3), ("put", 12), ("delete", 1), ("delete", 9)])
def test_a_forget_that_crashes_anywhere_ends_clean_when_rerun(tmp_path, op, n):
    root = tmp_path / "store"
    _store_with_every_hiding_place(LocalStore(root))
    with pytest.raises(SystemExit, match="crash"):
        forget_users(CrashingStore(root, op, n), list(FORGOTTEN), new_run="after", delete_old=True)
    store = LocalStore(root)
    res = forget_users(store, list(FORGOTTEN), new_run="after" if op == "put" else None, delete_old=True)
    assert res.still_holding == []
    _check_clean(store, latest_run_id(store))


def test_forget_never_drops_another_users_rows(tmp_path):
    store = LocalStore(tmp_path / "store")
    write_forget_case(store, "before")
    before = RunReader(store, "before").get_jsonl("rejects.jsonl")
    forget_users(store, ["user"], new_run="after")
    after = RunReader(store, "after").get_jsonl("rejects.jsonl")
    assert after == before  # `user` has no reject: all 7 kept (a substring match dropped all 7)
    ids = RunReader(store, "after").get_parquet("assignments.parquet").column("user_id").to_pylist()
    assert sorted(ids) == sorted([*OTHERS, "alice"])


def test_forget_cleans_a_store_without_any_committed_run(tmp_path):
    store = LocalStore(tmp_path / "store")
    write_forget_case(store, "abandoned", commit=False)
    res = forget_users(store, ["alice"], delete_old=True)
    assert res.source_run is None and res.deleted == ["abandoned"] and res.still_holding == []
    assert store.list("runs/") == []
