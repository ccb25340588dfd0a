"""Which group edits sit in an `EditBank`: a bounded LRU of (run_id, group_id, markers) → bank row.

The bank is the table a batched forward indexes (row 0 = identity); this cache decides which
edits occupy its other rows. It is the "slots" tier of serving (vLLM's `max_loras`, Ray Serve
LLM's `max_num_adapters_per_replica`): cold edits come from storage, warm ones are a row index.

    cache = EditCache(bank, capacity=256)
    row = await cache.pin(key, load_edit, run.edit, timeout)  # pinned
    ... run a batch that uses `row` ...
    cache.release(row)                             # once the batch is done with it

Rules:
- Rows are allocated lazily (`EditBank.add`) up to `capacity` editable rows; after that the least
  recently used row that nobody holds is overwritten in place (`EditBank.set_row`).
- A row is *pinned* from `acquire`/`install` until the matching `release`. Pinned rows are never
  evicted, so a batch in flight always reads the edit it was admitted with, even when a newer run
  or another group wants the slot. When every row is pinned, `install` raises `CacheFullError`
  (the caller waits for a release: capacity is a scheduling constraint, not a failure).
- `pin` is that wait for asyncio callers: one FIFO line for hits and misses. While anyone is in
  line, a new request queues too, even for a resident key, so steady hits on resident groups
  cannot starve a cold group: once a cold request has its edit and waits for a row, nobody behind
  it is served until it has one. A request whose edit is still loading holds no row and blocks
  nobody. Rows are handed to waiters under the lock when they come free (`release`), so no
  wake-up is lost; a waiter that leaves (timeout, cancel) gives back a row handed to it.
- Keys carry the run id, so the same group id of two runs is two entries: a switch of `latest`
  never serves one run's edit under another run's name.

No Ray here: the cache is plain Python over an `EditBank` and is unit-tested on its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from chameleon.config import EditConfig
from chameleon.core.edit import Edit, EditBank

CacheKey = tuple[str, str, tuple[str, ...]]
"""(run_id, group_id, the markers of the marker part the row adds to the group's edit)."""


class CacheFullError(RuntimeError):
    """Every editable row is pinned by a batch in flight; retry after a release."""


@dataclass(eq=False)
class _Ticket:
    """A request in the line for a row."""

    key: CacheKey
    params: EditConfig
    loop: asyncio.AbstractEventLoop
    edit: Edit | None = None
    """Set once loaded; a ticket without one holds no place in the line for a free row."""
    loading: bool = False
    row: int | None = None
    """The row handed to it (pinned for it)."""
    error: BaseException | None = None
    wake: asyncio.Future[None] | None = None


@dataclass
class CacheStats:
    capacity: int
    """Editable rows at most (row 0, the identity, is not counted)."""
    allocated: int
    """Editable rows the bank holds so far (grows lazily up to `capacity`)."""
    resident: int
    """Rows holding an edit."""
    pinned: int
    """Rows held by admitted requests (never evicted)."""
    hits: int = 0
    misses: int = 0
    installs: int = 0
    evictions: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class EditCache:
    """Bounded LRU of group edits over the rows of one `EditBank` (see the module docstring).

    Thread-safe: every method takes one lock, so admission (on an event loop) and batch
    completion (possibly elsewhere) may interleave. Writing a row never touches a pinned row, so
    a forward pass that reads pinned rows concurrently is unaffected.
    """

    def __init__(self, bank: EditBank, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"edit cache capacity must be >= 1, got {capacity}")
        if bank.n_rows != 1:
            raise ValueError(
                f"the edit cache needs a fresh bank (only the identity row), this one has {bank.n_rows} rows"
            )
        self.bank = bank
        self.capacity = capacity
        self._lru: OrderedDict[CacheKey, int] = OrderedDict()  # oldest first
        self._key_of: dict[int, CacheKey] = {}
        self._free: list[int] = []  # allocated rows holding no entry
        self._pins: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stats = CacheStats(capacity=capacity, allocated=0, resident=0, pinned=0)
        # Requests in line for a row, oldest first.
        self._line: list[_Ticket] = []

    # -- lookups -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def row_of(self, key: CacheKey) -> int | None:
        """The key's row without pinning it or touching its recency."""
        return self._lru.get(key)

    def key_of(self, row: int) -> CacheKey | None:
        return self._key_of.get(row)

    def keys(self) -> list[CacheKey]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._lru)

    def pins(self, row: int) -> int:
        return self._pins.get(row, 0)

    def stats(self) -> CacheStats:
        with self._lock:
            s = self._stats
            return CacheStats(
                capacity=s.capacity,
                allocated=self.bank.n_rows - 1,
                resident=len(self._lru),
                pinned=sum(1 for n in self._pins.values() if n > 0),
                hits=s.hits,
                misses=s.misses,
                installs=s.installs,
                evictions=s.evictions,
            )

    # -- pin / install / release ---------------------------------------------------------------

    def acquire(self, key: CacheKey) -> int | None:
        """Pin and return the key's row when resident and nobody is in line (a hit, now most
        recent); None otherwise (then `pin` waits in line)."""
        with self._lock:
            row = self._lru.get(key)
            if row is None or self._line:
                self._stats.misses += row is None
                return None
            self._lru.move_to_end(key)
            self._pins[row] += 1
            self._stats.hits += 1
            return row

    def install(self, key: CacheKey, edit: Edit, params: EditConfig | None = None) -> int:
        """Put `edit` in a row for `key` and pin it; returns the row.

        When the key became resident meanwhile (another request loaded it), that row is pinned and
        returned unchanged. Otherwise a free row is used, the bank grows by one row while under
        capacity, or the least recently used unpinned row is overwritten. Raises `CacheFullError`
        when every row is pinned, and `ValueError` for an edit the bank cannot hold (wrong site,
        hidden size, rank or layers); the cache is unchanged in both cases.
        """
        with self._lock:
            return self._install_locked(key, edit, params or EditConfig())

    def _install_locked(self, key: CacheKey, edit: Edit, params: EditConfig) -> int:
        """`install` with `self._lock` held."""
        row = self._lru.get(key)
        if row is not None:
            self._lru.move_to_end(key)
            self._pins[row] += 1
            return row
        if self._free:
            row = self._free[-1]
            self.bank.set_row(row, edit, params.alpha, params.beta, params.centered)
            self._free.pop()
        elif self.bank.n_rows - 1 < self.capacity:
            row = self.bank.add(edit, params.alpha, params.beta, params.centered)
        else:
            victim = next((k for k, r in self._lru.items() if self._pins[r] == 0), None)
            if victim is None:
                raise CacheFullError(
                    f"all {self.capacity} edit rows are held by requests in flight; "
                    "raise edit_cache_size or retry when a batch finishes"
                )
            row = self._lru[victim]
            # set_row validates before writing: on error the victim stays resident and intact.
            self.bank.set_row(row, edit, params.alpha, params.beta, params.centered)
            del self._lru[victim]
            del self._key_of[row]
            self._stats.evictions += 1
        self._lru[key] = row
        self._key_of[row] = key
        self._pins[row] += 1
        self._stats.installs += 1
        return row

    def release(self, row: int) -> None:
        """Drop one pin of `row` (taken by `acquire`, `install` or `pin`)."""
        with self._lock:
            self._unpin_locked(row)
            self._serve_locked()

    def _unpin_locked(self, row: int) -> None:
        if self._pins.get(row, 0) <= 0:
            raise ValueError(f"row {row} is not pinned")
        self._pins[row] -= 1
        if self._pins[row] == 0:
            del self._pins[row]

    async def pin(
        self,
        key: CacheKey,
        load: Callable[[], Awaitable[Edit]],
        params: EditConfig | None = None,
        timeout: float = 10.0,
    ) -> int:
        """The key's row, pinned: at once on a hit with nobody in line, else in FIFO order.
        `load()` gives the edit and is awaited (once, while in line) only if the key is not
        resident. Raises `CacheFullError` when no row came within `timeout` seconds,
        `ValueError` for an edit the bank cannot hold, and whatever `load` raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._lock:
            row = self._lru.get(key)
            if row is not None and not self._line:
                self._lru.move_to_end(key)
                self._pins[row] += 1
                self._stats.hits += 1
                return row
            t = _Ticket(key, params or EditConfig(), loop)
            self._stats.misses += row is None
            self._line.append(t)
            self._serve_locked()
        try:
            while True:
                with self._lock:
                    if t.error is not None:
                        raise t.error
                    if t.row is not None:
                        return t.row
                    must_load = t.edit is None and not t.loading and key not in self._lru
                    if must_load:
                        t.loading = True
                    else:
                        t.wake = loop.create_future()
                if must_load:
                    edit = await load()
                    with self._lock:
                        t.edit, t.loading = edit, False
                        self._serve_locked()
                    continue
                await asyncio.wait_for(t.wake, max(0.0, deadline - loop.time()))
        except BaseException as exc:
            with self._lock:
                if isinstance(exc, TimeoutError) and t.row is not None:
                    return t.row  # a row was handed over as the deadline passed: it is ours
                if t in self._line:
                    self._line.remove(t)
                if t.row is not None:  # handed a row as we left: give it back
                    self._unpin_locked(t.row)
                    t.row = None
                self._serve_locked()  # leaving may unblock those behind
            if isinstance(exc, TimeoutError):
                raise CacheFullError(
                    f"all {self.capacity} edit rows stayed held by requests in flight for "
                    f"{timeout:g} s; raise edit_cache_size or retry"
                ) from None
            raise

    async def install_waiting(
        self, key: CacheKey, edit: Edit, params: EditConfig | None, timeout: float
    ) -> int:
        """`pin` with the edit at hand."""

        async def loaded() -> Edit:
            return edit

        return await self.pin(key, loaded, params, timeout)

    def _serve_locked(self) -> None:
        """Hand rows to the line, oldest first: a resident key is pinned for its ticket; a loaded
        edit is installed in a free or evictable row. Once a loaded ticket finds no row, nobody
        behind it is served (no overtaking); tickets still loading are passed over."""
        blocked = False
        for t in list(self._line):
            row = self._lru.get(t.key)
            if row is None and t.edit is None:
                if not t.loading:
                    self._notify(t)  # its key was evicted while it waited: it loads now
                continue
            if blocked:
                continue
            if row is not None:
                self._lru.move_to_end(t.key)
                self._pins[row] += 1
                self._stats.hits += 1
            else:
                try:
                    row = self._install_locked(t.key, t.edit, t.params)
                except CacheFullError:
                    blocked = True
                    continue
                except ValueError as exc:
                    t.error = exc
                    self._line.remove(t)
                    self._notify(t)
                    continue
            self._line.remove(t)
            t.row = row
            if not self._notify(t):  # its loop is gone: nobody will use the row
                t.row = None
                self._unpin_locked(row)

    @staticmethod
    def _notify(t: _Ticket) -> bool:
        """Wake the ticket's waiter on its own loop (thread-safe); False when that loop is closed."""
        fut = t.wake
        if fut is None:
            return True  # not waiting yet: it sees its row when it next looks

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        try:
            t.loop.call_soon_threadsafe(wake)
        except RuntimeError:
            return False
        return True

    def waiting(self) -> int:
        """Requests in line for a row."""
        with self._lock:
            return len(self._line)

    def discard_run(self, run_id: str) -> int:
        """Forget the unpinned entries of a run (their rows become free); returns how many.

        Optional housekeeping after a run switch: plain LRU eviction reclaims them too.
        """
        with self._lock:
            dropped = [k for k, r in self._lru.items() if k[0] == run_id and self._pins[r] == 0]
            for k in dropped:
                row = self._lru.pop(k)
                del self._key_of[row]
                self._free.append(row)
            self._serve_locked()
            return len(dropped)
