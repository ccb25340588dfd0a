"""The context every stage of an evaluation is given (`EvalContext`: settings, config, store,
users, prediction cache, clock, the model, answers and runs). The runner makes it and the ablations
take it: neither imports the other."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from chameleon.config import ChameleonConfig, EditConfig
from chameleon.core.edit import Edit
from chameleon.core.generation import generate_answers
from chameleon.data.artifacts import RunReader, committed_manifest
from chameleon.data.model_mirror import load_model_for
from chameleon.data.storage import LocalStore, Store, open_store
from chameleon.evaluation.cache import PredictionCache, key_hash
from chameleon.evaluation.lamp import LampQuestion, load_lamp7
from chameleon.evaluation.runs import (
    derive_run,
    reduce_signature,
    run_synthesis,
    seed_partitions,
    short_hash,
    write_users_jsonl,
)
from chameleon.evaluation.settings import EvalSettings
from chameleon.evaluation.split import select_users
from chameleon.job.calibrate import calibrate_in_process
from chameleon.job.drivers import answers_on_ray

log = logging.getLogger("chameleon.evaluation.runner")


class Clock:
    """Wall and CPU seconds per stage (CPU shows how much a shared machine slowed the wall time)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
            log.info("stage %s done in %.1f s", name, self.wall[name])

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": {k: round(v, 1) for k, v in self.wall.items()},
            "cpu_s": {k: round(v, 1) for k, v in self.cpu.items()},
            "total_wall_s": round(sum(self.wall.values()), 1),
        }


@dataclass
class EvalContext:
    """What every stage of one evaluation works with, made once by `open` and passed explicitly:
    the settings and config, the store of runs, the users, the prediction cache, the clock, and
    the model (loaded on first use). Stages get answers (`answers`) and runs (`ensure_synthesis`,
    `derived`) through it."""

    s: EvalSettings
    cfg: ChameleonConfig
    store: Store
    work: Path
    """The workdir: users files, the prediction cache, the default store."""
    cache: PredictionCache
    golds: dict[str, str]
    """Each LaMP question's reference tweet."""
    position: dict[str, int]
    """Each question's position in the LaMP file (the split rule is stated in positions)."""
    tuning: list[LampQuestion]
    reported: list[LampQuestion]
    progress: bool = True
    clock: Clock = field(default_factory=lambda: Clock())
    _mt: Any = None

    @classmethod
    def open(
        cls, settings: EvalSettings, cfg: ChameleonConfig, model_and_tokenizer=None, progress: bool = True
    ) -> EvalContext:
        """Open the store, load the LaMP users and split them (`chameleon.evaluation.split`)."""
        work = Path(settings.workdir)
        work.mkdir(parents=True, exist_ok=True)
        store = (
            open_store(settings.store, **settings.store_options)
            if settings.store
            else LocalStore(work / "store")
        )
        questions, golds = load_lamp7(settings.lamp_dir)
        tuning, reported = select_users(
            questions, settings.tuning_users, settings.reported_users, validation=settings.validation
        )
        return cls(
            s=settings,
            cfg=cfg,
            store=store,
            work=work,
            cache=PredictionCache(work / "predictions"),
            golds=golds,
            position={q.id: i for i, q in enumerate(questions)},
            tuning=tuning,
            reported=reported,
            progress=progress,
            _mt=model_and_tokenizer,
        )

    # -- model -----------------------------------------------------------------------------
    @property
    def model_tok(self):
        """(model, tokenizer), loaded on first use."""
        if self._mt is None:
            self._mt = load_model_for(self.cfg.model)
        return self._mt

    def gen_key(self) -> dict[str, Any]:
        return {
            "model": self.cfg.model.name_or_path,
            "revision": self.cfg.model.revision,
            "max_new_tokens": self.s.max_new_tokens,
            "batch_size": self.s.batch_size,
        }

    def _bar(self, name: str) -> Callable[[int, int], None] | None:
        if not self.progress:
            return None
        last = [0.0]

        def cb(done: int, total: int) -> None:
            now = time.perf_counter()
            if done == total or now - last[0] > 30:
                last[0] = now
                log.info("  %s: %d/%d answers", name, done, total)

        return cb

    def answers(
        self,
        name: str,
        key: dict[str, Any],
        questions: Sequence[LampQuestion],
        messages: Sequence[str],
        edits: Sequence[Edit | None] | None = None,
        edit_cfg: EditConfig | None = None,
        plain: bool = False,
    ) -> list[str]:
        """Raw answers (cached by ``name`` + ``key`` + users), under the settings' system prompt
        (none when ``plain``)."""
        ids = [q.id for q in questions]
        system = None if plain else self.s.system_prompt
        full = {
            **self.gen_key(),
            **key,
            "system": system,
            "name": name,
            "users": key_hash({"ids": ids}),
            "messages": key_hash({"m": list(messages)}),
        }

        def produce() -> list[str]:
            if self.s.use_ray:
                return answers_on_ray(
                    self.cfg,
                    messages,
                    edits=edits,
                    edit_cfg=edit_cfg,
                    system=system,
                    max_new_tokens=self.s.max_new_tokens,
                    batch_size=self.s.batch_size,
                    address=self.s.address,
                )
            model, tok = self.model_tok
            return generate_answers(
                model,
                tok,
                messages,
                edits=edits,
                edit_cfg=edit_cfg,
                system=system,
                max_new_tokens=self.s.max_new_tokens,
                batch_size=self.s.batch_size,
                progress=self._bar(name),
            )

        with self.clock.stage(f"generate:{name}"):
            raw, hit = self.cache.cached(name, full, ids, produce)
        if hit:
            log.info("  %s: %d answers from the cache", name, len(raw))
        return raw

    # -- runs ------------------------------------------------------------------------------
    def synth_run_id(self) -> str:
        if self.s.synth_run:
            return self.s.synth_run
        t, r = self.s.tuning_users, self.s.reported_users
        sig = short_hash(
            {
                "synth": self.cfg.synth.model_dump(),
                "subspace": self.cfg.subspace.model_dump(),
                "model": self.cfg.model.name_or_path,
            }
        )
        return f"{self.s.run_tag}-t{t[0]}-{t[1]}-r{r[0]}-{r[1]}-{sig}"

    def ensure_synthesis(self) -> str:
        run_id = self.synth_run_id()
        path = write_users_jsonl(self.work / "users" / f"{run_id}.jsonl", self.tuning + self.reported)
        reuse = self.s.reuse_synthesis_from
        if reuse and reuse != run_id and committed_manifest(self.store, reuse) is None:
            log.warning("run %s (to reuse) is not in %s; synthesizing every user", reuse, self.store.uri)
        elif reuse and reuse != run_id:
            copied = seed_partitions(self.store, reuse, run_id, path, self.cfg)
            log.info("reused %d partitions of run %s", len(copied), reuse)
        with self.clock.stage("synthesis"):
            model_tok = None if self.s.use_ray else self.model_tok
            run_synthesis(
                path,
                self.store,
                run_id,
                self.cfg,
                model_and_tokenizer=model_tok,
                use_ray=self.s.use_ray,
                address=self.s.address,
                progress=self.progress,
                store_options=self.s.store_options,
            )
        return run_id

    def derived(self, src: str, name: str, cfg: ChameleonConfig, user_ids: Sequence[str] | None) -> str:
        run_id = f"{src}-{name}-{short_hash(reduce_signature(cfg))}"
        model, tok = self.model_tok
        with self.clock.stage("reduce"):
            derive_run(
                self.store, src, run_id, cfg, user_ids, partial(calibrate_in_process, model, tok, cfg=cfg)
            )
        return run_id

    def manifest_layers(self, run_id: str) -> list[int]:
        return list(RunReader(self.store, run_id).manifest.captured_layers)
