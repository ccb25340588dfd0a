"""`chameleon eval`: the LaMP-7 evaluation (baselines, Chameleon user / group / unseen, ablations).

Wire it into the main parser with `add_eval_parser(subparsers)`; `jobs/evaluate.py` runs it through
`chameleon.cli.main`. Building the parser imports neither torch, numpy nor Ray: the evaluation
modules are imported when the command runs. Logging is configured by `chameleon.cli.main`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from chameleon.config import ChameleonConfig
from chameleon.evaluation.names import ABLATIONS, EVAL_SYNTH_DEFAULTS, METHODS
from chameleon.evaluation.settings import EvalSettings
from chameleon.flags import JOB_FLAGS, Flag, add_flags, flag_overrides

EVAL_FLAGS: tuple[Flag, ...] = (
    Flag("synth.insight_max_new_tokens", "token budget of each insight", int),
    Flag("edit.alpha", "edit: scale of the added personalized component", float),
    Flag("edit.beta", "edit: scale of the removed non-personalized component", float),
    Flag("subspace.theta_p", "how θP is computed", choices=("svd", "svd_diff", "mean_diff")),
    Flag("subspace.theta_n", "how θN is computed", choices=("ccs", "mean_diff")),
    Flag("subspace.ccs_steps", "gradient steps of each CCS restart", int),
    Flag("synth.pair_source", "where pairs come from", choices=("insight", "history", "style")),
    Flag(
        "synth.query_faking",
        "how missing queries are faked",
        choices=("neutralize", "wrap"),
    ),
    Flag(
        "edit.form",
        "how an edit changes the states",
        choices=("projection", "additive", "norm_preserving"),
        name="--edit-form",
    ),
    Flag(
        "edit.strength",
        "additive step relative to the layer's norm (without calibration)",
        float,
    ),
    Flag("edit.calibrate", "choose layer and strength on held-out history", bool),
    Flag("synth.heldout_items", "history items per user kept for calibration", int),
    Flag(
        "synth.reference_items",
        "history items per user kept out of pairs and calibration (style references)",
        int,
    ),
    Flag("synth.style_max_items", "style pair source: pairs per user at most", int),
    Flag("synth.shared_pairs", "style pair source: shared (format) pairs per user", int),
    Flag(
        "edit.user_calibration_items",
        "residual composition: held-out items a user needs for its own strength",
        int,
    ),
    Flag(
        "edit.composition",
        "whole edits, or a global edit + group/user residuals",
        choices=("whole", "residual"),
        name="--edit-composition",
    ),
    Flag("edit.calibration_examples", "held-out texts per group's calibration", int),
    Flag(
        "edit.strengths",
        "calibration's candidate strengths, comma-separated",
        lambda v: [float(x) for x in v.split(",")],
    ),
    Flag(
        "edit.markers",
        "marker parts: markers a user's own history can add to their served row, comma-separated",
        lambda v: [x for x in v.split(",") if x],
        name="--markers",
    ),
    Flag(
        "groups.features",
        "what users are clustered on",
        choices=("subspace", "contrast", "style"),
        name="--group-features",
    ),
)
"""Settings the evaluation overrides besides the job's flags."""

EPILOG = """\
examples:
  # every method on reported users 500..599, groups from tuning users 0..99 too (rerun to resume)
  chameleon eval --out out/lamp7 --tuning-users 0:100 --reported-users 500:600

  # tuning phase: groups from tuning users 0..99, methods scored on held-out tuning users 100..160
  chameleon eval --out out/lamp7-val --tuning-users 0:100 --reported-users 100:160 --validation

  # ablations on 50 tuning users, then the setting they select applied to the reported users
  chameleon eval --out out/lamp7-tuned --ablations all --ablation-users 0:50 --select-on-tuning

  # on a Ray cluster: synthesis and every method's answers on 4 model replicas with a GPU each
  chameleon eval --out out/lamp7-ray --ray --store s3://bucket/eval --num-actors 4 --num-gpus-per-actor 1

  # redraw report.md and the plots from the files of an earlier evaluation
  chameleon eval --out out/lamp7 --report-only
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help; flags without a value (None) say theirs in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:  # the flag tables' flags say their default themselves
            return action.help
        if action.nargs == 0 and action.const is True:  # store_true
            return f"{action.help} (default: off)"
        return super()._get_help_string(action)


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        if text == "all":
            return choices
        if text in ("", "none"):
            return ()
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {bad}; choose from {', '.join(choices)} (or all / none)"
            )
        return items

    return parse


EVAL_SETTING_FLAGS: tuple[Flag, ...] = (
    Flag(
        "out_dir",
        "output directory (results.json, predictions.parquet, report.md, *.png)",
        required=True,
        name="--out",
    ),
    Flag(
        "workdir",
        "prediction cache, users files and (default) the store of runs; rerun to resume",
    ),
    Flag(
        "store",
        "store of the runs: s3://bucket/prefix or a path (unset: WORKDIR/store); "
        "with --ray on a cluster, one every node reaches",
    ),
    Flag(
        "lamp_dir",
        "LaMP-7 directory (unset: $CHAMELEON_LAMP7_DIR, else ../shared/data/lamp/lamp7 next to the repository)",
    ),
    Flag("tuning_users", "file positions START:STOP of tuning users, inside 0:500"),
    Flag("reported_users", "file positions START:STOP of reported users, inside 500:1500"),
    Flag("methods", "comma list, or all: " + ",".join(METHODS), _csv(METHODS), shown_default="all"),
    Flag("rag_k", "profile items retrieved by BM25 for the RAG baseline", int),
    Flag("max_new_tokens", "answer budget of every evaluated method", int, name="--eval-max-new-tokens"),
    Flag("batch_size", "generation batch size of the evaluated methods", int, name="--eval-batch-size"),
    Flag("n_resamples", "bootstrap resamples", int),
    Flag("run_tag", "prefix of run ids in the store"),
    Flag(
        "synth_run",
        "run id of the synthesis, reused when committed in the store "
        "(unset: the tag, the users and a hash of the synthesis settings)",
    ),
    Flag(
        "reuse_synthesis_from",
        "copy the partitions of this committed run that hold the same users, to extend an evaluation "
        "(unset: synthesize every user)",
    ),
    Flag(
        "ablations",
        "comma list, all or none (tuning users only): " + ",".join(ABLATIONS),
        _csv(ABLATIONS),
        shown_default="none",
    ),
    Flag(
        "ablation_run",
        "committed run holding the tuning users' pairs for the ablations (unset: this synthesis)",
    ),
    Flag(
        "ablation_users",
        "tuning positions START:STOP scored in the ablations (unset: all tuning users)",
    ),
    Flag("history_users", "tuning positions of the history-size ablation"),
    Flag(
        "select_on_tuning",
        "use the ablations' best group-level setting (tuning ROUGE-L) for the reported run",
        bool,
    ),
    Flag(
        "validation",
        "tuning phase: --reported-users are held-out tuning users (inside 0:500, disjoint from --tuning-users)",
        bool,
    ),
    Flag("system_prompt", "system turn of every method's prompt; `none` for none"),
    Flag(
        "use_ray",
        "run on Ray: the synthesis as the Ray job, and every method's answers "
        "on the same kind of actor pool (--num-actors, --num-gpus-per-actor size both)",
        bool,
        name="--ray",
    ),
    Flag("address", "Ray cluster address with --ray (unset: $RAY_ADDRESS, else a new local Ray)"),
)
"""The evaluation's own settings (`EvalSettings`), one flag each."""


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eval` to a `subparsers` object of the `chameleon` parser; returns the new parser."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate on LaMP-7 users: copy / base / RAG / Chameleon (user, group, unseen), ablations, report",
        description="Synthesize pairs for tuning + reported LaMP-7 users (one job, resumable), run every method on "
        "the reported users, score with ROUGE-1/L (bootstrap CIs, paired tests), write results.json, "
        "predictions.parquet and report.md with plots. Ablations run on tuning users only.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    add_flags(p, EVAL_SETTING_FLAGS, EvalSettings.model_construct())
    p.add_argument(
        "--s3-endpoint",
        help="S3-compatible endpoint URL for an s3:// --store "
        "(default: $CHAMELEON_S3_ENDPOINT, else $AWS_ENDPOINT_URL, else AWS)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of this process")
    p.add_argument(
        "--report-only", action="store_true", help="redraw report.md and plots from the files in --out"
    )
    p.add_argument(
        "--config",
        help="YAML file with config sections (see cluster/job-config.example.yaml); "
        "default: the evaluation's synthesis settings shown below",
    )
    defaults = ChameleonConfig().with_overrides(EVAL_SYNTH_DEFAULTS)
    add_flags(p, JOB_FLAGS, defaults)
    add_flags(p, EVAL_FLAGS, defaults)
    p.set_defaults(func=cmd_eval)
    return p


def eval_config(args: argparse.Namespace) -> ChameleonConfig:
    """The ChameleonConfig of an evaluation: YAML or the evaluation's synthesis defaults, then flags."""
    cfg = (
        ChameleonConfig.from_yaml(args.config)
        if args.config
        else ChameleonConfig().with_overrides(EVAL_SYNTH_DEFAULTS)
    )
    return cfg.with_overrides(flag_overrides(args, JOB_FLAGS)).with_overrides(
        flag_overrides(args, EVAL_FLAGS)
    )


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    """The EvalSettings of an evaluation: the flags of `EVAL_SETTING_FLAGS` that were given, the S3
    endpoint, the synthesis seed and the command line."""
    extra: dict[str, Any] = {
        "store_options": {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {},
        "command": "chameleon eval " + " ".join(shlex.quote(a) for a in _eval_argv()),
    }
    if args.seed is not None:
        extra["seed"] = args.seed
    return EvalSettings.model_validate({**flag_overrides(args, EVAL_SETTING_FLAGS), **extra})


def cmd_eval(args: argparse.Namespace) -> int:
    if args.report_only:
        from chameleon.evaluation.report import write_report

        print(f"report: {write_report(args.out)}")
        return 0
    import torch

    from chameleon.evaluation.runner import run_evaluation

    torch.set_num_threads(max(1, args.threads))
    cfg = eval_config(args)
    settings = eval_settings(args)
    res = run_evaluation(settings, cfg)
    print(f"\n{res['n_users']} reported users, model {res['model']}")
    for m, e in res["methods"].items():
        vb = e.get("vs_base", {}).get("rougeL")
        rel = (
            ""
            if not vb or vb["rel"] is None
            else f"  vs base {vb['rel'] * 100:+.1f} % (p={vb['p_bootstrap']:.3f})"
        )
        print(f"  {m:26s} ROUGE-1 {e['rouge1']:.3f}  ROUGE-L {e['rougeL']:.3f}{rel}")
    g = res["goal"]
    if g.get("evaluated"):
        target = g["target_rel_vs_base"] * 100
        print(
            f"goal (group >= base +{target:.0f} % ROUGE-L and > RAG, paired): {'met' if g['met'] else 'NOT met'}"
        )
    print(f"report: {args.out}/report.md")
    return 0


def _eval_argv() -> list[str]:
    """The arguments after `eval` on this process's command line (for the report's reproduce line)."""
    argv = sys.argv[1:]
    if "eval" in argv:
        return argv[argv.index("eval") + 1 :]
    return argv
