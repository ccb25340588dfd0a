"""The LRU of group edits over EditBank rows (no Ray, no model)."""

from __future__ import annotations

import pytest
import torch

from chameleon.config import EditConfig
from chameleon.core.edit import Edit, EditBank
from chameleon.serving.edit_cache import CacheFullError, EditCache

D = 8
LAYERS = [1, 3]


def edit(seed: int, layers=(1, 3), rank: int = 2, site: str = "mlp", d: int = D) -> Edit:
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    p = torch.linalg.qr(torch.randn(n, d, rank, generator=g)).Q.transpose(1, 2)  # [n, r, d] orthonormal rows
    nvec = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return Edit(layers=list(layers), theta_p=p, theta_n=nvec, mean=torch.randn(n, d, generator=g), site=site)


def fresh(capacity: int) -> EditCache:
    return EditCache(EditBank(D, LAYERS, max_rank=3), capacity)


def row_matches(bank: EditBank, row: int, e: Edit, params: EditConfig = EditConfig()) -> bool:
    ref = EditBank(D, LAYERS, max_rank=3)
    r = ref.add(e, params.alpha, params.beta, params.centered)
    return (
        torch.equal(bank.P[row], ref.P[r])
        and torch.equal(bank.N[row], ref.N[r])
        and torch.equal(bank.mu[row], ref.mu[r])
        and torch.equal(bank.active[row], ref.active[r])
        and float(bank.alpha[row]) == params.alpha
        and float(bank.beta[row]) == params.beta
    )


def test_miss_install_hit_release():
    cache = fresh(2)
    key = ("run-1", "g000")
    assert cache.acquire(key) is None
    row = cache.install(key, edit(0))
    assert row == 1 and cache.pins(row) == 1 and row_matches(cache.bank, row, edit(0))
    assert cache.acquire(key) == row and cache.pins(row) == 2
    cache.release(row)
    cache.release(row)
    assert cache.pins(row) == 0
    with pytest.raises(ValueError, match="not pinned"):
        cache.release(row)
    s = cache.stats()
    assert (s.hits, s.misses, s.installs, s.resident, s.pinned, s.allocated) == (1, 1, 1, 1, 0, 1)


def test_rows_grow_lazily_then_lru_reuses_the_oldest_unpinned_row():
    cache = fresh(2)
    a, b, c = ("r", "a"), ("r", "b"), ("r", "c")
    ra = cache.install(a, edit(1))
    rb = cache.install(b, edit(2))
    assert (ra, rb) == (1, 2) and cache.bank.n_rows == 3
    cache.release(ra)
    cache.release(rb)
    assert cache.acquire(a) == ra  # a is now the most recent: b is the LRU victim
    cache.release(ra)
    params = EditConfig(alpha=0.5, beta=2.0, centered=False)
    rc = cache.install(c, edit(3), params)
    assert rc == rb and cache.bank.n_rows == 3, "the bank never grows past capacity"
    assert b not in cache and cache.row_of(c) == rb and cache.key_of(rb) == c
    assert row_matches(cache.bank, rc, edit(3), params), "set_row rewrote the reused row in place"
    assert row_matches(cache.bank, ra, edit(1)), "the other row is untouched"
    assert cache.stats().evictions == 1
    assert cache.keys() == [a, c]


def test_pinned_rows_are_never_evicted():
    cache = fresh(2)
    ra = cache.install(("r", "a"), edit(1))
    rb = cache.install(("r", "b"), edit(2))
    before = cache.bank.P.clone()
    with pytest.raises(CacheFullError, match="in flight"):
        cache.install(("r", "c"), edit(3))
    assert torch.equal(cache.bank.P, before) and len(cache) == 2
    cache.release(rb)
    rc = cache.install(("r", "c"), edit(3))
    assert rc == rb and ("r", "a") in cache and cache.pins(ra) == 1
    assert row_matches(cache.bank, ra, edit(1))


def test_same_group_of_two_runs_is_two_entries():
    cache = fresh(4)
    r1 = cache.install(("run-1", "g000"), edit(1))
    r2 = cache.install(("run-2", "g000"), edit(2))
    assert r1 != r2
    assert row_matches(cache.bank, r1, edit(1)) and row_matches(cache.bank, r2, edit(2))
    # A request admitted on run-1 keeps its row while run-2 takes over.
    cache.release(r2)
    assert cache.discard_run("run-1") == 0, "pinned entries of the old run stay"
    cache.release(r1)
    assert cache.discard_run("run-1") == 1
    assert ("run-1", "g000") not in cache
    r3 = cache.install(("run-2", "g001"), edit(3))
    assert r3 == r1, "a discarded row is reused before the bank grows"
    assert cache.bank.n_rows == 3


def test_install_of_a_resident_key_pins_without_reloading():
    cache = fresh(2)
    row = cache.install(("r", "a"), edit(1))
    again = cache.install(("r", "a"), edit(99))  # two requests raced on one miss
    assert again == row and cache.pins(row) == 2
    assert row_matches(cache.bank, row, edit(1))


def test_bad_edits_leave_the_cache_unchanged():
    cache = fresh(1)
    row = cache.install(("r", "a"), edit(1))
    cache.release(row)
    with pytest.raises(ValueError, match="site"):
        cache.install(("r", "b"), edit(2, site="residual"))
    with pytest.raises(ValueError, match="not one of this bank's layers"):
        cache.install(("r", "c"), edit(3, layers=(0, 1)))
    with pytest.raises(ValueError, match="hidden size"):
        cache.install(("r", "d"), edit(4, d=D + 1))
    assert cache.keys() == [("r", "a")] and row_matches(cache.bank, row, edit(1))
    assert cache.stats().evictions == 0


def test_identity_row_and_arguments():
    with pytest.raises(ValueError, match="capacity"):
        fresh(0)
    bank = EditBank(D, LAYERS)
    bank.add(edit(0))
    with pytest.raises(ValueError, match="fresh bank"):
        EditCache(bank, 2)
    cache = fresh(3)
    rows = {cache.install(("r", str(i)), edit(i)) for i in range(3)}
    assert 0 not in rows, "row 0 stays the identity"
    assert not cache.bank.active[0].any()


def test_cached_rows_edit_a_batch_like_a_freshly_built_bank(tiny_model_and_tok):
    """Rows reused through the cache give the same batched forward as a bank built directly."""
    model, tok = tiny_model_and_tok
    d = model.config.hidden_size
    layers = [1, 2]
    edits = [edit(s, layers=layers, d=d) for s in range(3)]
    cache = EditCache(EditBank(d, layers, max_rank=3), capacity=2)
    r0 = cache.install(("r", "0"), edits[0])
    cache.release(r0)
    r1 = cache.install(("r", "1"), edits[1])
    r2 = cache.install(("r", "2"), edits[2])  # evicts edit 0 (row reuse via set_row)
    assert r2 == r0

    ref = EditBank(d, layers, max_rank=3)
    ref_rows = ref.add_many(edits[1:])
    ids = tok(["hello there", "a b c d"], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        with cache.bank.apply(model, [r1, r2]):
            got = model(ids).logits
        with ref.apply(model, ref_rows):
            want = model(ids).logits
        base = model(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, base)


@pytest.fixture(scope="module")
def tiny_model_and_tok():
    from tiny_models import embedded_tokenizer, tiny_llama

    tok = embedded_tokenizer()
    return tiny_llama(tok, layers=3), tok


# --------------------------------------------------------------------------------------------
# Waiting for a row (asyncio): FIFO, woken by releases, no lost wake-ups under cancellation


def test_waiters_get_rows_first_come_first_served():
    import asyncio

    async def main():
        cache = fresh(1)
        held = cache.install(("r", "held"), edit(0))
        order: list[int] = []

        async def waiter(i: int):
            row = await cache.install_waiting(("r", f"w{i}"), edit(i + 1), None, timeout=10)
            order.append(i)
            cache.release(row)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(waiter(i)))
            await asyncio.sleep(0)  # each is queued before the next arrives
        assert cache.waiting() == 5
        cache.release(held)  # one release: each waiter takes the row, releases it, wakes the next
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert order == [0, 1, 2, 3, 4]
        assert cache.waiting() == 0 and cache.stats().pinned == 0

    asyncio.run(main())


def test_a_waiter_times_out_with_cache_full_and_leaves_the_queue():
    import asyncio

    async def main():
        cache = fresh(1)
        held = cache.install(("r", "held"), edit(0))
        with pytest.raises(CacheFullError, match="stayed held"):
            await cache.install_waiting(("r", "x"), edit(1), None, timeout=0.05)
        assert cache.waiting() == 0
        # A cancelled waiter leaves too, and a hit on a resident key never waits.
        t = asyncio.create_task(cache.install_waiting(("r", "y"), edit(2), None, timeout=10))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert cache.waiting() == 0
        assert await cache.install_waiting(("r", "held"), edit(0), None, timeout=0) == held
        cache.release(held)
        cache.release(held)
        assert cache.stats().pinned == 0

    asyncio.run(main())


def test_contention_500_tasks_10_keys_capacity_2_random_cancellation():
    """500 requests for 10 keys over 2 rows; a third of them cancelled at a random moment (while
    loading, queued, just woken, or holding a row). Every task ends (no deadlock), nobody times
    out while rows keep coming free (no starvation), no pin outlives its task, and a granted row
    always holds the requested key."""
    import asyncio
    import random

    rng = random.Random(13)
    keys = [("run", f"g{i}") for i in range(10)]
    edits = {k: edit(i) for i, k in enumerate(keys)}
    figures = {"deadlocks": 0, "pin_leaks": 0, "starved": 0, "wrong_rows": 0, "served": 0, "cancelled": 0}

    async def main():
        cache = fresh(2)

        async def request(key):
            await asyncio.sleep(rng.random() * 0.002)  # the edit load
            row = cache.acquire(key)
            if row is None:
                try:
                    row = await cache.install_waiting(key, edits[key], None, timeout=30)
                except CacheFullError:
                    figures["starved"] += 1
                    return
            try:
                if cache.key_of(row) != key:
                    figures["wrong_rows"] += 1
                await asyncio.sleep(rng.random() * 0.003)  # the batch using the row
                await asyncio.sleep(0)
                figures["served"] += 1
            finally:
                cache.release(row)

        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(request(rng.choice(keys))) for _ in range(500)]
        for t in tasks:
            if rng.random() < 1 / 3:
                loop.call_later(rng.random() * 0.3, t.cancel)
        try:
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        except TimeoutError:
            figures["deadlocks"] = 1
            return
        figures["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in done)
        assert not [r for r in done if isinstance(r, Exception)], "no task failed"
        figures["pin_leaks"] = sum(cache.pins(r) for r in range(1, cache.bank.n_rows))
        assert cache.waiting() == 0

    asyncio.run(main())
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    assert (figures["deadlocks"], figures["pin_leaks"], figures["starved"], figures["wrong_rows"]) == (
        0,
        0,
        0,
        0,
    )
    assert figures["served"] + figures["cancelled"] == 500 and figures["cancelled"] > 50


def test_no_lost_wake_up_when_the_woken_request_cannot_use_the_row():
    """A request ahead in line whose edit does not fit the bank must not keep the freed row from
    the one behind it. Defect put back (a woken waiter whose install raises keeps the wake-up):
    the second waiter times out with CacheFullError while a row is free."""
    import asyncio

    async def main():
        cache = fresh(1)
        held = cache.install(("r", "held"), edit(0))
        bad = asyncio.create_task(cache.install_waiting(("r", "bad"), edit(1, d=4), None, timeout=5))
        await asyncio.sleep(0)
        good = asyncio.create_task(cache.install_waiting(("r", "good"), edit(2), None, timeout=1.0))
        await asyncio.sleep(0)
        cache.release(held)
        with pytest.raises(ValueError):
            await bad
        row = await good
        assert cache.key_of(row) == ("r", "good")
        cache.release(row)

    asyncio.run(main())


def test_hits_on_resident_groups_cannot_starve_a_cold_group():
    """2 rows held by 2 hot groups whose requests overlap (each new one arrives before the
    previous one ends, so neither row is ever unpinned by the hot traffic alone); a cold group
    waiting in line gets a row at the next release. Defect put back (hits skip the line): the hot
    groups keep both rows pinned and the cold request times out."""
    import asyncio

    async def main():
        cache = fresh(2)
        hot = [("r", "h0"), ("r", "h1")]

        def loader(key):
            async def load():
                return edit(int(key[1][1:]) if key[1][1:].isdigit() else 9)

            return load

        held = {k: [await cache.pin(k, loader(k), None, timeout=1)] for k in hot}
        cold = asyncio.create_task(cache.pin(("r", "c"), loader(("r", "c")), None, timeout=0.5))
        await asyncio.sleep(0)
        assert cache.waiting() == 1, "the cold group waits for a row"
        queued = []
        for _ in range(60):  # hot arrivals for ~0.6 s, longer than the cold request's timeout
            for k in hot:
                t = asyncio.create_task(cache.pin(k, loader(k), None, timeout=5))
                await asyncio.sleep(0)  # the new request arrives (a hit pins at once) ...
                if held[k]:
                    cache.release(held[k].pop(0))  # ... then the previous one ends
                if t.done():
                    held[k].append(t.result())
                else:
                    queued.append(t)
            if cold.done():
                break
            await asyncio.sleep(0.01)
        row = await cold  # CacheFullError here with the defect
        assert cache.key_of(row) == ("r", "c")
        cache.release(row)
        for t in queued:
            cache.release(await t)
        for rows in held.values():
            for r in rows:
                cache.release(r)
        assert cache.waiting() == 0 and cache.stats().pinned == 0

    asyncio.run(main())


def test_a_hit_with_nobody_in_line_never_waits_and_the_edit_loads_once():
    import asyncio

    calls = []

    async def main():
        cache = fresh(2)

        async def load():
            calls.append(1)
            await asyncio.sleep(0.01)
            return edit(1)

        rows = await asyncio.gather(*(cache.pin(("r", "a"), load, None, timeout=5) for _ in range(3)))
        assert len(set(rows)) == 1
        for r in rows:
            cache.release(r)
        assert await cache.pin(("r", "a"), load, None, timeout=0) == rows[0]  # a plain hit
        cache.release(rows[0])

    asyncio.run(main())
    assert len(calls) <= 3  # each request in line may load (the replica dedupes store reads)
