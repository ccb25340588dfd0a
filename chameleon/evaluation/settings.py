"""What decides an evaluation besides the ChameleonConfig: `EvalSettings`, filled by `chameleon
eval` from its flag table (`chameleon.evaluation.cli.EVAL_SETTING_FLAGS`). Light: the CLI builds
its parser from it without importing torch."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chameleon.evaluation.names import ABLATIONS, METHODS, NO_PREAMBLE
from chameleon.evaluation.split import parse_range


class EvalSettings(BaseModel):
    """Everything that decides what an evaluation computes (besides the ChameleonConfig)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    out_dir: str
    """Where results.json, predictions.parquet, report.md and plots go."""
    workdir: str = ".cache/eval"
    """Users files, the prediction cache and (without ``store``) the store of runs: resumable state."""
    store: str | None = None
    """Store of the runs (``s3://bucket/prefix`` or a path; a cluster's actors must reach it);
    default ``<workdir>/store``."""
    store_options: dict[str, Any] = Field(default_factory=dict)
    """Options of an ``s3://`` store (e.g. ``endpoint_url``)."""
    lamp_dir: str | None = None
    tuning_users: tuple[int, int] = (0, 100)
    """File positions of the tuning users (synthesis + groups; ablations)."""
    reported_users: tuple[int, int] = (500, 600)
    """File positions of the reported users (must be past the tuning part)."""
    methods: tuple[str, ...] = METHODS
    rag_k: int = Field(3, ge=1)
    validation: bool = False
    """A tuning-phase run: the scored ("reported") users are held-out tuning users (0..499, disjoint
    from ``tuning_users``); decisions are taken on such runs only."""
    system_prompt: str | None = NO_PREAMBLE
    """The system turn of every method's prompt (``*_plain`` methods: none; ``"none"``: none)."""
    max_new_tokens: int = Field(48, ge=1)
    """Answer budget of every evaluated method (greedy)."""
    batch_size: int = Field(16, ge=1)
    n_resamples: int = Field(1000, ge=1)
    seed: int = 0
    run_tag: str = "lamp7"
    """Prefix of the run ids in the store."""
    synth_run: str | None = None
    """Run id of the synthesis (created when absent, reused when committed); default: derived from
    the tag, the users and the synthesis settings."""
    reuse_synthesis_from: str | None = None
    """A committed synthesis run whose partitions with the same users are copied instead of
    generated again (see :func:`~chameleon.evaluation.runs.seed_partitions`)."""
    use_ray: bool = False
    """Run the synthesis as the Ray job and generate every method's answers on a Ray Data actor
    pool (``cfg.job`` sizes both); otherwise everything runs in this process."""
    address: str | None = None
    """Ray cluster address with ``use_ray`` (default ``RAY_ADDRESS``, else a new local Ray)."""
    ablations: tuple[str, ...] = ()
    ablation_run: str | None = None
    """Committed run whose pairs of the tuning users feed the ablations (default: this evaluation's
    synthesis); lets an extended evaluation reuse the ablations of an earlier one."""
    ablation_users: tuple[int, int] | None = None
    """Tuning users scored in the ablations (default: all tuning users)."""
    history_users: tuple[int, int] = (0, 20)
    """Tuning users of the history-size ablation (needs its own synthesis)."""
    select_on_tuning: bool = False
    """Pick the reduce/edit configuration of the reported run from the ablations (tuning users)."""
    command: str = ""
    """The command line that produced the results (written into the report)."""

    @field_validator("tuning_users", "reported_users", "ablation_users", "history_users", mode="before")
    @classmethod
    def _range(cls, v: Any) -> Any:
        return None if v is None else parse_range(v)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        return v

    @field_validator("ablations")
    @classmethod
    def _known_ablations(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in v if a not in ABLATIONS]
        if bad:
            raise ValueError(f"unknown ablations {bad}; known: {', '.join(ABLATIONS)}")
        return v

    @field_validator("system_prompt")
    @classmethod
    def _none_is_no_system_turn(cls, v: str | None) -> str | None:
        return None if v == "none" else v
