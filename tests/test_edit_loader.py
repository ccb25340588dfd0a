"""`chameleon.serving.edit_loader`: which edit answers a request, and its pinned bank row."""

from __future__ import annotations

import asyncio

import pytest
from conftest import copy_run

from chameleon.core.fingerprint import fingerprint_model
from chameleon.core.model import hidden_size, model_device, num_layers
from chameleon.data.layout import group_key
from chameleon.data.model_mirror import load_model_for
from chameleon.data.storage import LocalStore
from chameleon.serving.config import ServeConfig
from chameleon.serving.edit_loader import EditLoader
from chameleon.serving.metrics import NULL_METRICS
from chameleon.serving.protocol import ApiError
from chameleon.serving.registry import RunRegistry
from chameleon.serving.replica_api import GenerationRequest
from chameleon.serving.sampling import SamplingParams

RUN = "tiny-run-1"


@pytest.fixture(scope="module")
def loaded(published_tiny_run, tmp_path_factory):
    """(model, fingerprint, a store holding the tiny run and a copy with one group file broken)."""
    src, _manifest, model_dir = published_tiny_run
    store = LocalStore(tmp_path_factory.mktemp("edit-loader-store"))
    copy_run(src, store, RUN)
    cfg = ServeConfig(store=store.uri, model=str(model_dir))
    model, _tok = load_model_for(cfg.model)
    return model, fingerprint_model(model, cfg.model.name_or_path), store, src, model_dir


def loader(loaded, run: str = RUN, **settings) -> EditLoader:
    model, fingerprint, store, _src, model_dir = loaded
    cfg = ServeConfig(store=store.uri, model=str(model_dir), run=run, **settings)
    registry = RunRegistry(store, run, fingerprint, num_layers(model), cfg.fallback_group)
    registry.refresh()
    return EditLoader(cfg, registry, hidden_size(model), model_device(model), NULL_METRICS)


def ask(**who) -> GenerationRequest:
    return GenerationRequest("completion", SamplingParams(), prompt="hi", **who)


def test_resolution_order(loaded):
    edits = loader(loaded)
    run = edits.registry.current
    member, group = next(iter(run.user_groups.items()))
    other = sorted(run.group_ids - {group})[0]
    assert edits.resolve(ask(user=member, group_id=other)).group_id == other, "a named group wins"
    got = edits.resolve(ask(user=member))
    assert (got.group_id, got.source, got.run.run_id) == (group, "user", RUN)
    assert edits.resolve(ask(user="nobody")).group_id is None, "fallback base: no edit"
    off = edits.resolve(ask(user=member, personalization_off=True))
    assert (off.group_id, off.source) == (None, "off")
    with pytest.raises(ApiError) as err:
        edits.resolve(ask(group_id="no-such-group"))
    assert (err.value.status, err.value.code) == (404, "group_not_found")
    assert edits.resolve(ask(user=member)).describe().user == member
    with_fallback = loader(loaded, fallback=f"group:{other}")
    assert with_fallback.resolve(ask(user="nobody")).group_id == other


def test_no_run_is_503_unless_personalization_is_off(loaded):
    edits = loader(loaded, run="never-published")
    assert edits.resolve(ask(personalization_off=True)).source == "off"
    with pytest.raises(ApiError) as err:
        edits.resolve(ask(user="u"))
    assert (err.value.status, err.value.code) == (503, "no_run")


def test_pinned_rows_are_shared_per_group_and_released(loaded):
    edits = loader(loaded)
    run = edits.registry.current
    a, b = sorted(run.group_ids)[:2]

    async def pins():
        return await asyncio.gather(edits.pin(run, a), edits.pin(run, a), edits.pin(run, b))

    p1, p2, p3 = asyncio.run(pins())
    assert p1.row == p2.row != p3.row and p1.row >= 1, "one row per group, row 0 is the base"
    cache = edits.cache_for(run.spec)
    assert cache.pins(p1.row) == 2
    for p in (p1, p1, p2, p3):  # a second release is a no-op
        p.release()
    assert cache.pins(p1.row) == 0 and cache.pins(p3.row) == 0
    status = edits.status()
    assert status["edit_loads_in_flight"] == 0 and status["edit_caches"][0]["pinned"] == 0


def test_a_users_marker_part_is_their_own_row_and_never_a_groups(loaded):
    edits = loader(loaded)
    run = edits.registry.current
    got = edits.resolve(ask(user="emoji_lover-1"))
    assert got.source == "user" and got.markers == ("emoticon",)
    group = got.group_id
    mates = [u for u, g in run.user_groups.items() if g == group and not u.startswith("emoji_lover")]
    named = edits.resolve(ask(user="emoji_lover-1", group_id=group))
    assert named.markers == (), "a group named in the request is the group's edit alone"

    async def pins():
        own = await edits.pin(run, group, got.markers)
        plain = await edits.pin(run, group, ())
        return own, plain

    own, plain = asyncio.run(pins())
    assert own.row != plain.row and min(own.row, plain.row) >= 1
    bank = edits.cache_for(run.spec).bank
    slot = bank.layers.index(3)  # the tiny model's marker layer
    assert bank.S[own.row, slot].abs().sum() > 0 and bank.S[plain.row, slot].abs().sum() == 0
    if mates:  # a group-mate without the marker is served the group's row
        assert edits.resolve(ask(user=mates[0])).markers == ()
    own.release()
    plain.release()


def test_a_broken_edit_is_a_503_remembered_without_store_detail(loaded):
    _model, _fp, store, src, _dir = loaded
    gid = sorted(loaded_run_groups(loaded))[0]
    copy_run(src, store, RUN, "broken-group", corrupt=group_key(gid))
    edits = loader(loaded, run="broken-group")
    run = edits.registry.current
    for _ in range(2):
        with pytest.raises(ApiError) as err:
            asyncio.run(edits.pin(run, gid))
        assert (err.value.status, err.value.code) == (503, "artifact_error")
        assert "broken-group" not in err.value.message and gid not in err.value.message
    assert edits.status()["edit_failures_cached"] == 1
    assert any(gid in p for p in edits.registry.status()["problems"]), "operators see the detail"


def loaded_run_groups(loaded) -> set[str]:
    return set(loader(loaded).registry.current.group_ids)
