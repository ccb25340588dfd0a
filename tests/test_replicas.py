"""The model-replica pool's failure accounting: only the item an actor died on is charged."""

from __future__ import annotations

import os
import sys
import time

import pytest

from chameleon.config import ChameleonConfig
from chameleon.job.replicas import DEADLINE_EXIT_CODE, Deadline, ReplicaPool


def test_a_deadline_firing_as_its_block_ends_decides_once():
    exits: list[int] = []
    finished_first = Deadline(1.0, "partition 0", exit_process=exits.append)
    assert finished_first.finish()
    finished_first.expire()  # the timer fired just after: the actor keeps running
    assert exits == []
    expired_first = Deadline(1.0, "partition 0", exit_process=exits.append)
    expired_first.expire()
    assert exits == [DEADLINE_EXIT_CODE]
    assert not expired_first.finish()  # the block must not hand back a result from a dying actor


class Handed:
    """An item that carries the time the pool handed it to Ray (stamped as the call pickles it)."""

    def __init__(self, name: str, handed_at: float = 0.0) -> None:
        self.name, self.handed_at = name, handed_at

    def __reduce__(self):
        return Handed, (self.name, time.time())


class DiesOnItem:
    """A stand-in replica: exits its process on the item "die"; its restart takes half a
    second, as a model reload does."""

    def __init__(self, cfg_json: str) -> None:
        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(0.5)
        self.up_at = time.time()

    def ready(self) -> bool:
        return True

    def work(self, item: Handed) -> bool:
        """Whether the item was handed to this actor once it was up (not while it restarted)."""
        if item.name == "die":
            os._exit(1)
        return item.handed_at >= self.up_at


def test_the_pool_waits_for_a_dead_actor_to_restart_before_handing_it_an_item(ray_session):
    # Ray's workers cannot import this test module: ship these classes by value.
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = ChameleonConfig().with_overrides(
        {"job.max_task_retries": 0, "job.num_cpus_per_actor": 0.5, "job.partition_timeout_s": 120}
    )
    pool = ReplicaPool(DiesOnItem, cfg, 1)
    try:
        # Each innocent item comes right after a death. Handed over at once, while the actor
        # restarts, Ray runs it there later or fails it (at-most-once), charging it with a death
        # it did not cause; the pool must wait until the restarted actor answers.
        items = [Handed("die"), Handed("innocent")] * 2
        results = pool.run("work", items, drop_lost_items=True)
    finally:
        pool.close()
    assert results == {1: True, 3: True}
    assert pool.deaths == [2]


class StartsSlowly:
    """A stand-in replica whose start (its model load) takes longer than the pool allows."""

    def __init__(self, cfg_json: str) -> None:
        time.sleep(60)

    def ready(self) -> bool:
        return True

    def work(self, item: str) -> str:
        return item


def test_an_actor_that_does_not_come_up_in_time_fails_the_stage_naming_the_start(ray_session):
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = ChameleonConfig().with_overrides(
        {"job.num_cpus_per_actor": 0.5, "job.actor_start_timeout_s": 3, "job.partition_timeout_s": 600}
    )
    pool = ReplicaPool(StartsSlowly, cfg, 1)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"waited too long for actor 0 to start"):
            pool.run("work", ["a"])
    finally:
        pool.close()
    # The start's own bound, not the partition deadline's (600 s), ended the wait.
    assert time.monotonic() - started < 30
