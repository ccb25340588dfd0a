"""A small published run whose input holds the hard cases of `chameleon forget`, for the tests and
the integrity benchmark: no model (random hidden states), the real validator and publish.

    manifest = write_forget_case(store, "before")
    FORGOTTEN                  # ("user", "alice"): the ids to forget
    forgotten_texts()          # texts that belong to them and nowhere else
    other_reject_markers()     # one text per reject of other users: each must survive

The hard cases: a user named `user` (every reject row has the key `user_id`); `alice`, also
rejected as `"alice "` (an id that failed validation), in a line that is not JSON, and in a broken
JSON line whose id can still be read; and rejects of other users that mention `alice` or hold
`user` inside longer words (`user_id`, `user-7`), which must all be kept.
"""

from __future__ import annotations

import json

import torch

from chameleon.config import ChameleonConfig
from chameleon.core.fingerprint import ModelFingerprint
from chameleon.core.synth import UserPairs
from chameleon.data.artifacts import RunWriter
from chameleon.data.inputs import parse_jsonl
from chameleon.data.layout import REJECTS
from chameleon.data.manifest import RunManifest
from chameleon.data.schema import validate_records
from chameleon.data.storage import Store, read_parquet_bytes
from chameleon.job.publish import reduce_and_publish
from chameleon.job.run import write_partition
from chameleon.job.tables import pairs_to_tables

FORGOTTEN = ("user", "alice")
HIDDEN, LAYERS, PAIRS = 16, 2, 4
_STYLES = ("OMG so hyped!!!", "i guess it was fine.", "Indeed, most agreeable.", "lol ok")


def _history(tag: str) -> list[dict[str, str]]:
    return [{"text": f"{tag} says {_STYLES[i % 4]} note {i}"} for i in range(6)]


def input_lines(n_others: int = 10) -> list[str]:
    """The users file: `n_others` ordinary users, the forgotten ones, and every hard reject."""
    lines = [json.dumps({"user_id": f"user-{i}", "history": _history(f"other{i}")}) for i in range(n_others)]
    lines += [
        json.dumps({"user_id": "user", "history": _history("zebrauser")}),
        json.dumps({"user_id": "alice", "history": _history("zebraalice")}),
        # alice's own rejects: an id that fails validation, a line that is not JSON, broken JSON.
        json.dumps({"user_id": "alice ", "history": _history("zebraspaced")}),
        "alice wrote zebraunreadable and then the line broke {{{",
        '{"user_id": "alice", "history": [{"text": "zebrabroken',
        # Other users' rejects: each must survive forgetting `user` and `alice`.
        json.dumps({"user_id": "bob ", "history": _history("keepbobspace")}),
        json.dumps({"user_id": "carol", "history": [], "note": "keepcarol met alice and the user"}),
        "keepdave: the user_id of user-7 is not mine {",
        json.dumps({"user_id": "user-2", "history": "keepuser2 not a list"}),
    ]
    return lines


def forgotten_texts() -> list[str]:
    return ["zebrauser", "zebraalice", "zebraspaced", "zebraunreadable", "zebrabroken"]


def other_reject_markers() -> list[str]:
    return ["keepbobspace", "keepcarol", "keepdave", "keepuser2"]


def _pairs(uid: str, seed: int, texts: list[str]) -> UserPairs:
    g = torch.Generator().manual_seed(seed)
    return UserPairs(
        user_id=uid,
        group_id=None,
        selected=list(range(PAIRS)),
        history_embedding=torch.randn(HIDDEN, generator=g),
        insight_p=f"insight of {texts[0]}",
        insight_n="neutral insight",
        queries=[f"query {k} about {texts[k % len(texts)]}" for k in range(PAIRS)],
        personalized=[f"answer in the style of {texts[k % len(texts)]}" for k in range(PAIRS)],
        neutral=[f"neutral {k}" for k in range(PAIRS)],
        emb_p=torch.randn(PAIRS, LAYERS, HIDDEN, generator=g) + 1.0,
        emb_n=torch.randn(PAIRS, LAYERS, HIDDEN, generator=g),
        heldout_queries=[f"held-out query of {texts[-1]}"],
        heldout_texts=[texts[-1]],
    )


def case_config() -> ChameleonConfig:
    return ChameleonConfig().with_overrides(
        {
            "edit.calibrate": False,
            "subspace.ccs_steps": 20,
            "subspace.ccs_restarts": 1,
            "groups.features": "subspace",
            "groups.n_groups": 2,
            "groups.min_group_size": 2,
            "groups.min_contributors": 2,
        }
    )


def write_forget_case(
    store: Store, run_id: str, n_others: int = 10, *, commit: bool = True
) -> RunManifest | None:
    """Publish the case as run `run_id` (partitions of 4 users, rejects as the job writes them);
    with `commit=False`, stop before the manifest (a run without one). Returns the manifest."""
    records = parse_jsonl("\n".join(input_lines(n_others)).encode())
    accepted, rejects = validate_records(records)
    writer = RunWriter(store, run_id)
    writer.put_jsonl(REJECTS, [json.loads(json.dumps(r.to_dict(), default=repr)) for r in rejects])
    users = [_pairs(u.user_id, i, [h.text for h in u.history]) for i, u in enumerate(accepted)]
    n_parts = 0
    for start in range(0, len(users), 4):
        pairs, profiles = pairs_to_tables(users[start : start + 4])
        write_partition(writer, n_parts, pairs, profiles, [])
        n_parts += 1
    if not commit:
        return None
    fingerprint = ModelFingerprint("random", "0" * 64, "0" * 64, HIDDEN, LAYERS)
    counts = {
        "records": len(records),
        "accepted": len(accepted),
        "rejected": len(rejects),
        "partitions": n_parts,
    }
    return reduce_and_publish(
        writer,
        cfg=case_config(),
        layers=list(range(LAYERS)),
        fingerprint=fingerprint,
        n_partitions=n_parts,
        counts=counts,
        timings={},
    )


def hide_everywhere(store: Store, n_others: int = 10) -> None:
    """The case in every place a user's bytes can hide: a run whose deletion was interrupted
    (manifest gone, files left), an abandoned job (never committed), and the latest run `before`
    with an abandoned attempt folder of its own next to the committed one."""
    write_forget_case(store, "halfgone", n_others)
    store.delete("runs/halfgone/manifest.json")  # what an interrupted --delete-old leaves
    write_forget_case(store, "abandoned", n_others, commit=False)
    write_forget_case(store, "before", n_others)
    # The forgotten users come after the others: in the last partition.
    old = max(k for k in store.list("runs/before/attempts/") if "/pairs/" in k)
    store.put_bytes(
        "runs/before/attempts/19700101T000000-deadbeef00/" + old.split("/", 4)[4], store.get_bytes(old)
    )


def forgotten_needles() -> list[bytes]:
    """What no object may hold after forgetting `FORGOTTEN`: their texts, and their ids as JSON
    strings (`"user"`, not the key `"user_id"`; `"alice "`, the id that failed validation)."""
    ids = [*FORGOTTEN, "alice "]
    return [t.encode() for t in forgotten_texts()] + [json.dumps(i).encode() for i in ids]


def bytes_found(store: Store, needles: list[bytes], prefix: str = "") -> list[tuple[str, bytes]]:
    """(key, needle) for every needle in every object under `prefix` (attempt folders, done records
    and runs without a manifest included), Parquet also decoded to JSON rows. A check independent
    of `chameleon.data.user_scan`: plain bytes, no id rules."""
    hits = []
    for key in store.list(prefix):
        data = store.get_bytes(key)
        if key.endswith(".parquet"):
            data += json.dumps(
                read_parquet_bytes(data).to_pylist(), default=repr, ensure_ascii=False
            ).encode()
        hits += [(key, n) for n in needles if n in data]
    return hits
