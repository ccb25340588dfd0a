"""The map stage's progress, in figures a person can read, while the job runs and in its manifest.

    users 1,536/10,000 (15%) | 41.3 users/s | 2,210 tok/s | 3 failed | ETA 3m25s

One live line: a bar on a terminal, else (a job's log, a pipe) one line per `interval_s`. Users of
partitions adopted from an earlier attempt count as done from the start; the rates count only what
this attempt mapped. `figures()` are the same numbers for the manifest's `timings_s`. Both
drivers report the same way: after each partition, its users, failures and generated tokens.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class MapProgress:
    """Users done of `total` (`resumed` of them adopted before this attempt), users/s, generated
    tokens/s, failures so far, ETA."""

    def __init__(
        self,
        total: int,
        *,
        resumed: int = 0,
        enabled: bool = True,
        interval_s: float = 30.0,
        stream: IO[str] | None = None,
        clock=time.monotonic,
    ) -> None:
        self.total, self.resumed = total, resumed
        self.users = self.failed = self.tokens = 0
        self.clock = clock
        self.started = clock()
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self._last_line = self.started
        self.enabled = enabled
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = (
            tqdm(total=total, initial=resumed, desc="map", unit="user", file=self.stream, dynamic_ncols=True)
            if enabled and is_tty
            else None
        )

    def update(self, users: int, failed: int = 0, tokens: int = 0) -> None:
        """A partition finished: `users` of it (`failed` of them failed), `tokens` generated."""
        self.users += users
        self.failed += failed
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(self._rates(), refresh=False)
            self.bar.update(users)
        elif self.enabled and self.clock() - self._last_line >= self.interval_s:
            self._print()

    def _elapsed(self) -> float:
        return max(self.clock() - self.started, 1e-9)

    def _rates(self) -> str:
        left = self.total - self.resumed - self.users
        users_per_s = self.users / self._elapsed()
        eta = _duration(left / users_per_s) if users_per_s > 0 else "?"
        return (
            f"{users_per_s:.1f} users/s | {self.tokens / self._elapsed():,.0f} tok/s | "
            f"{self.failed} failed | ETA {eta}"
        )

    def line(self) -> str:
        done = self.resumed + self.users
        share = done / self.total if self.total else 1.0
        return f"users {done:,}/{self.total:,} ({share:.0%}) | {self._rates()}"

    def _print(self) -> None:
        self._last_line = self.clock()
        print(f"map: {self.line()}", file=self.stream, flush=True)

    def close(self) -> None:
        """The final figures: the bar's last state, or one last line."""
        if self.bar is not None:
            self.bar.set_postfix_str(self._rates(), refresh=True)
            self.bar.close()
        elif self.enabled:
            self._print()

    def figures(self) -> dict[str, Any]:
        """For the manifest's `timings_s`: this attempt's users mapped and failed, tokens, rates."""
        elapsed = self._elapsed()
        return {
            "map_users": self.users,
            "map_users_failed": self.failed,
            "map_users_resumed": self.resumed,
            "map_tokens": self.tokens,
            "map_users_per_s": self.users / elapsed,
            "map_tokens_per_s": self.tokens / elapsed,
        }
