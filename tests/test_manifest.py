"""The run manifest as a typed contract: JSON round trip, old formats, refusals, the user-shard
codec (`data.user_shards`) that the manifest lists, and artifacts that are byte-identical for the
same input and config."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import copy_run, stub_manifest, tiny_job_config

from chameleon.config import EditConfig
from chameleon.core.edit import Edit
from chameleon.data.artifacts import MANIFEST, ArtifactError, RunReader, RunWriter
from chameleon.data.manifest import (
    FORMAT_VERSION,
    BankSpec,
    GroupCalibration,
    GroupEntry,
    ManifestError,
    RunManifest,
)
from chameleon.data.published import PublishedRun
from chameleon.data.storage import LocalStore
from chameleon.data.user_shards import user_shard_edit, user_shard_tensors


def _edit(seed: int, form: str, layers=(1, 2), r: int = 2, d: int = 8) -> Edit:
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    return Edit(
        layers=list(layers),
        theta_p=torch.randn(n, r, d, generator=g),
        theta_n=torch.randn(n, d, generator=g),
        mean=torch.randn(n, d, generator=g),
        site="residual",
        steer=None if form == "projection" else torch.randn(n, d, generator=g),
        renorm=form == "norm_preserving",
    )


def _same_edit(a: Edit, b: Edit) -> bool:
    return (
        a.layers == b.layers
        and a.form == b.form
        and all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("theta_p", "theta_n", "mean"))
        and (a.steer is None) == (b.steer is None)
        and (a.steer is None or torch.equal(a.steer, b.steer))
    )


@pytest.mark.parametrize("form", ["projection", "additive", "norm_preserving"])
def test_user_shard_codec_round_trips_every_form(form):
    edits = [_edit(i, form) for i in range(3)]
    tensors = user_shard_tensors(
        edits,
        ccs_loss=torch.tensor([0.1, 0.2, 0.3]),
        has_edit=torch.tensor([True, False, True]),
        n_pairs_kept=torch.tensor([4, 0, 3]),
    )
    assert ("steer" in tensors) == (form != "projection")
    for i, e in enumerate(edits):
        assert _same_edit(user_shard_edit(tensors, i, "residual"), e)
    with pytest.raises(ValueError, match="one form"):
        user_shard_tensors(
            [_edit(0, "projection"), _edit(1, "additive")],
            ccs_loss=torch.zeros(2),
            has_edit=torch.ones(2, dtype=torch.bool),
            n_pairs_kept=torch.zeros(2),
        )


def test_job_manifest_round_trips_through_json_and_is_what_was_written(published_tiny_run):
    store, manifest, tiny_model_dir = published_tiny_run
    assert isinstance(manifest, RunManifest) and manifest.format_version == FORMAT_VERSION
    # Compared as JSON: a calibration without held-out texts has NaN NLLs (NaN != NaN).
    assert RunManifest.from_json(manifest.to_json()).to_json() == manifest.to_json()
    written = store.get_bytes(f"runs/{manifest.run_id}/{MANIFEST}").decode()
    assert written == manifest.to_json()
    assert RunReader(store, manifest.run_id).manifest.to_json() == written
    # The typed fields readers use.
    assert manifest.fingerprint.num_layers == 4 and manifest.hidden_size == manifest.fingerprint.hidden_size
    assert manifest.edit == tiny_job_config(tiny_model_dir).edit
    assert manifest.chameleon_config().edit == manifest.edit
    assert manifest.group_ids == [g.group_id for g in manifest.groups]
    assert manifest.bank_spec() == BankSpec(
        layers=tuple(sorted({*manifest.captured_layers, *manifest.marker_parts["layers"]})),
        site=manifest.site,
        max_rank=manifest.max_rank,
        positions=manifest.edit.positions,
    )
    data = json.loads(written)  # optional sections absent, not null
    assert "forget" not in data and all("key" in e for e in data["files"].values())


def test_a_format_2_run_still_reads(published_tiny_run, tmp_path):
    """Version 2: files at their logical paths (no `key`), no n_members / min_contributors /
    unpublished_groups, and (before edit forms) no `edit.form`: read with those defaults."""
    src, manifest, _ = published_tiny_run
    old = LocalStore(tmp_path / "old")
    data = json.loads(src.get_bytes(f"runs/{manifest.run_id}/{MANIFEST}"))
    for rel, entry in data["files"].items():
        old.put_bytes(f"runs/v2/{rel}", src.get_bytes(f"runs/{manifest.run_id}/{entry.pop('key')}"))
    for g in data["groups"]:
        del g["n_members"]
    for k in ("min_contributors", "unpublished_groups", "job_spec"):
        data.pop(k, None)
    del data["edit"]["form"]
    data.update(format_version=2, run_id="v2")
    old.put_json(f"runs/v2/{MANIFEST}", data)

    reader = RunReader(old, "v2")
    m = reader.manifest
    assert m.format_version == 2 and m.edit.form == "projection" and m.min_contributors is None
    assert all(g.n_members is None for g in m.groups) and m.unpublished_groups == []
    new, old_run = PublishedRun(RunReader(src, manifest.run_id)), PublishedRun(reader)
    gid = manifest.groups[0].group_id
    assert _same_edit(old_run.group_edit(gid), new.group_edit(gid))
    user = next(u for u, row in new.assignments().items() if row["has_user_edit"])
    assert _same_edit(old_run.user_edit(user), new.user_edit(user))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=4), "format version 4; this code reads versions 2, 3"),
        (lambda m: m.update(format_version=1), "format version 1; this code reads versions 2, 3"),
        (lambda m: m.pop("format_version"), "format version None"),
        (lambda m: m.update(site="attention"), "does not fit format version 3: site"),
        (lambda m: m.pop("captured_layers"), "captured_layers: Field required"),
        (lambda m: m["edit"].update(positions="first"), "edit.positions"),
        (lambda m: m["groups"][0].update(group_id="../etc"), "invalid group id"),
        (lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
    ],
)
def test_unreadable_manifests_are_refused_naming_the_run_and_the_field(published_tiny_run, change, message):
    src, manifest, _ = published_tiny_run
    run_id = copy_run(src, src, manifest.run_id, f"broken-{abs(hash(message)) % 10**8}", manifest_edit=change)
    with pytest.raises(ArtifactError, match="run 'broken-") as info:
        RunReader(src, run_id)
    assert message in str(info.value)
    with pytest.raises(ManifestError, match="not valid JSON"):
        RunManifest.from_json(b"{", run_id="x")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns about the dict it is given
def test_commit_validates_the_whole_manifest_before_publishing(local_store):
    writer = RunWriter(local_store, "r1")
    bad = stub_manifest()
    bad.groups.append({"group_id": "g", "n_users": 1, "n_pairs": 1, "layers": [0], "rank": [1]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="form"):
        writer.commit(bad)
    assert not local_store.exists(f"runs/r1/{MANIFEST}")
    assert stub_manifest(edit=EditConfig(alpha=2.0)).edit.alpha == 2.0


def test_artifacts_are_byte_identical_for_the_same_input_and_config(
    published_tiny_run, tiny_model_dir, tmp_path
):
    """The same users and config give the same bytes in every published file; the manifest
    differs only in its run id, creation time, timings and the files' attempt folders."""
    from chameleon.dev.demo import write_example_users
    from chameleon.job.local import run_local

    src, first, _ = published_tiny_run
    users = write_example_users(tmp_path / "users.jsonl")
    store = LocalStore(tmp_path / "store")
    second = run_local(str(users), store, "again", tiny_job_config(tiny_model_dir), progress=False)
    assert {k: e.sha256 for k, e in second.files.items()} == {k: e.sha256 for k, e in first.files.items()}
    volatile = {"run_id", "created_at", "timings_s", "files"}
    a, b = first.to_dict(), second.to_dict()
    assert {k: v for k, v in a.items() if k not in volatile} == {
        k: v for k, v in b.items() if k not in volatile
    }


def test_a_calibration_without_an_nll_commits_and_reads_back(local_store):
    """A group calibrated without held-out texts has NaN NLLs: written as `NaN`, as before."""
    nan = float("nan")
    cal = GroupCalibration(layer=0, strength=0.0, nll=nan, base_nll=nan)
    group = GroupEntry(
        group_id="g000", n_users=3, n_pairs=9, layers=[0], rank=[1], form="additive", calibration=cal
    )
    RunWriter(local_store, "r1").commit(stub_manifest(groups=[group]))
    back = RunReader(local_store, "r1").manifest.groups[0].calibration
    assert back is not None and math.isnan(back.nll) and math.isnan(back.base_nll) and back.layer == 0
