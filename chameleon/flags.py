"""Command-line flags that override single settings of a pydantic config: one table per command.

    FLAGS = (Flag("synth.pairs_per_user", "…", int), Flag("model.name_or_path", "…", name="--model"), …)
    add_flags(parser, FLAGS, defaults=ChameleonConfig())   # help shows each setting's default
    overrides = flag_overrides(args, FLAGS)               # {"model.name_or_path": "…"} (unset skipped)

Flags default to None, so a flag the user did not give never overrides a YAML file's value; the
help text shows the default the config itself would use. A boolean setting (`type=bool`) gets a
pair of switches, `--calibrate` / `--no-calibrate`, instead of a value to spell.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from chameleon.config import ChameleonConfig


@dataclass(frozen=True)
class Flag:
    setting: str
    """dotted config setting it overrides, e.g. `synth.pairs_per_user`"""
    help: str
    type: Callable[[str], Any] = str
    """how the value is parsed; `bool`: a `--flag` / `--no-flag` pair of switches"""
    choices: Sequence[str] | None = None
    required: bool = False
    shown_default: str | None = None
    """How the help states the default (default: the setting's default value)."""
    name: str | None = None
    """The flag, where it is not the setting's own name (`synth.pairs_per_user` → `--pairs-per-user`)."""

    @property
    def flag(self) -> str:
        return self.name or "--" + self.setting.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def auto_or(number: Callable[[str], Any]) -> Callable[[str], Any]:
    """A flag type taking `auto` or a number (e.g. `auto_or(float)` for a GPU count)."""

    def parse(text: str) -> Any:
        return "auto" if text == "auto" else number(text)

    parse.__name__ = f"auto or {number.__name__}"  # argparse names the type in its error
    return parse


def setting_default(defaults: BaseModel, setting: str) -> Any:
    """The value of a dotted setting in a config instance."""
    value: Any = defaults
    for part in setting.split("."):
        value = getattr(value, part)
    return value


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag], defaults: BaseModel) -> None:
    for f in flags:
        default = None if f.required else setting_default(defaults, f.setting)
        shown = "required" if f.required else f.shown_default or ("unset" if default is None else default)
        help_text = f"{f.help} [{f.setting}; {'' if f.required else 'default: '}{shown}]"
        if f.type is bool:
            # Not type=bool: bool("false") is True. None (neither switch) keeps the config's value.
            parser.add_argument(f.flag, action=argparse.BooleanOptionalAction, dest=f.dest, help=help_text)
            continue
        parser.add_argument(
            f.flag, type=f.type, choices=f.choices, dest=f.dest, required=f.required, help=help_text
        )


def flag_overrides(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """{dotted setting: value} of the flags that were given."""
    return {f.setting: getattr(args, f.dest) for f in flags if getattr(args, f.dest, None) is not None}


JOB_FLAGS: tuple[Flag, ...] = (
    Flag("model.name_or_path", "Hugging Face model id or local path", name="--model"),
    Flag("model.dtype", "weights dtype", choices=("auto", "float32", "bfloat16", "float16")),
    Flag("model.device_map", "e.g. `auto` to shard one replica over the GPUs of a node"),
    Flag("synth.pairs_per_user", "synthetic pairs per user", int),
    Flag("synth.history_k", "history items each user's pairs are made from", int),
    Flag(
        "synth.answer_max_new_tokens", "token budget of each synthetic answer", int, name="--max-new-tokens"
    ),
    Flag(
        "synth.batch_size",
        "generation batch size of the map stage (auto: 16 on CPU, 64-128 on a GPU)",
        auto_or(int),
    ),
    Flag("synth.seed", "seed of the synthesis", int),
    Flag("subspace.site", "where hidden states are read and edited", choices=("mlp", "residual")),
    Flag("subspace.n_layers", "layers each edit applies to", int),
    Flag("groups.n_groups", "number of groups to cluster users into", int),
    Flag("groups.min_group_size", "smallest group a cluster may form", int),
    Flag(
        "groups.group_column",
        "user field that names each user's group (instead of clustering)",
    ),
    Flag("job.num_actors", "model replicas (Ray actors) of the map stage", int),
    Flag(
        "job.num_gpus_per_actor",
        "GPUs per replica (auto: 1 when the cluster has GPUs, else CPU; a fraction shares a GPU)",
        auto_or(float),
    ),
    Flag(
        "job.users_per_partition",
        "users per map partition (the unit of resume)",
        int,
    ),
    Flag(
        "storage.single_writer",
        "use a store that does not enforce exclusive create (one writer at a time only)",
        bool,
    ),
)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` plus the job's setting flags."""
    parser.add_argument(
        "--config", help="YAML file with config sections (see cluster/job-config.example.yaml)"
    )
    add_flags(parser, JOB_FLAGS, ChameleonConfig())


def load_config(args: argparse.Namespace) -> ChameleonConfig:
    """The YAML file (if any), then the flags that were given."""
    cfg = ChameleonConfig.from_yaml(args.config) if getattr(args, "config", None) else ChameleonConfig()
    return cfg.with_overrides(flag_overrides(args, JOB_FLAGS))
