"""`chameleon eval`: the LaMP-7 evaluation (baselines, Chameleon user / group / unseen, ablations).

Wire it into the main parser with `add_eval_parser(subparsers)`; `jobs/evaluate.py` uses it too.
Heavy imports happen when the command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

EVAL_OVERRIDES = {
    "insight_max_new_tokens": "synth.insight_max_new_tokens",
    "alpha": "edit.alpha",
    "beta": "edit.beta",
    "theta_p": "subspace.theta_p",
    "theta_n": "subspace.theta_n",
    "ccs_steps": "subspace.ccs_steps",
}


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        if text in ("all",):
            return choices
        if text in ("", "none"):
            return ()
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)} (or all / none)")
        return items

    return parse


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eval` to a `subparsers` object of the `chameleon` parser; returns the new parser."""
    from chameleon.cli import add_config_flags  # noqa: PLC0415 (cli imports this module)
    from chameleon.evaluation import ABLATIONS, METHODS  # noqa: PLC0415

    p = subparsers.add_parser(
        "eval",
        help="evaluate on LaMP-7 users: copy / base / RAG / Chameleon (user, group, unseen), ablations, report",
        description="Synthesize pairs for tuning + reported LaMP-7 users (one job, resumable), run every method on "
        "the reported users, score with ROUGE-1/L (bootstrap CIs, paired tests), write results.json, "
        "predictions.parquet and report.md with plots. Ablations run on tuning users only.",
    )
    p.add_argument("--out", required=True, help="output directory (results.json, predictions.parquet, report.md, *.png)")
    p.add_argument("--workdir", default=".cache/eval", help="prediction cache, users files and (default) the store of runs; rerun to resume")
    p.add_argument("--store", help="store of the runs: s3://bucket/prefix or a path (default: WORKDIR/store); "
                   "with --ray on a cluster, one every node reaches")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL for an s3:// --store")
    p.add_argument("--lamp-dir", help="LaMP-7 directory (default: $CHAMELEON_LAMP7_DIR or ../shared/data/lamp/lamp7)")
    p.add_argument("--tuning-users", default="0:100", help="file positions START:STOP of tuning users, inside 0:500")
    p.add_argument("--reported-users", default="500:600", help="file positions START:STOP of reported users, inside 500:1500")
    p.add_argument("--methods", type=_csv(METHODS), default=METHODS, help="comma list (default: all): " + ",".join(METHODS))
    p.add_argument("--rag-k", type=int, default=3, help="profile items retrieved by BM25 for the RAG baseline")
    p.add_argument("--eval-max-new-tokens", type=int, default=48, help="answer budget of every evaluated method")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--run-tag", default="lamp7", help="prefix of run ids in the store")
    p.add_argument("--synth-run", help="run id of the synthesis (reused when committed in the work dir's store)")
    p.add_argument("--reuse-synthesis-from", metavar="RUN_ID",
                   help="copy the partitions of this committed run that hold the same users (extends an evaluation)")
    p.add_argument("--ablations", type=_csv(ABLATIONS), default=(),
                   help="comma list or all (tuning users only): " + ",".join(ABLATIONS))
    p.add_argument("--ablation-run", metavar="RUN_ID",
                   help="committed run holding the tuning users' pairs for the ablations (default: this synthesis)")
    p.add_argument("--ablation-users", help="tuning positions scored in ablations (default: all tuning users)")
    p.add_argument("--history-users", default="0:20", help="tuning positions of the history-size ablation")
    p.add_argument("--select-on-tuning", action="store_true",
                   help="use the ablations' best group-level setting (tuning ROUGE-L) for the reported run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--report-only", action="store_true", help="redraw report.md and plots from the files in --out")
    p.add_argument("--ray", action="store_true", help="run on Ray: the synthesis as the Ray job, and every method's answers on the same kind of actor pool "
                   "(--num-actors, --num-gpus-per-actor size both)")
    p.add_argument("--address", help="Ray cluster address (with --ray; default RAY_ADDRESS or a local Ray)")
    add_config_flags(p)
    p.add_argument("--insight-max-new-tokens", type=int, help="token budget of each insight")
    p.add_argument("--alpha", type=float, help="edit: scale of the added personalized component")
    p.add_argument("--beta", type=float, help="edit: scale of the removed non-personalized component")
    p.add_argument("--theta-p", choices=["svd", "svd_diff", "mean_diff"])
    p.add_argument("--theta-n", choices=["ccs", "mean_diff"])
    p.add_argument("--ccs-steps", type=int)
    p.set_defaults(func=cmd_eval)
    return p


def eval_config(args: argparse.Namespace):
    """The ChameleonConfig of an evaluation: YAML or the evaluation's synthesis defaults, then flags."""
    from chameleon.cli import OVERRIDES, load_config  # noqa: PLC0415
    from chameleon.config import ChameleonConfig  # noqa: PLC0415
    from chameleon.evaluation import EVAL_SYNTH_DEFAULTS  # noqa: PLC0415

    if args.config:
        cfg = load_config(args)
    else:
        cfg = ChameleonConfig().with_overrides(EVAL_SYNTH_DEFAULTS)
        cfg = cfg.with_overrides({dotted: getattr(args, flag, None) for flag, dotted in OVERRIDES.items()})
    return cfg.with_overrides({dotted: getattr(args, flag, None) for flag, dotted in EVAL_OVERRIDES.items()})


def cmd_eval(args: argparse.Namespace) -> int:
    from chameleon.evaluation import EvalSettings, run_evaluation, write_report  # noqa: PLC0415

    if args.report_only:
        path = write_report(args.out)
        print(f"report: {path}")
        return 0
    import torch  # noqa: PLC0415

    torch.set_num_threads(max(1, args.threads))
    logging.getLogger("chameleon").setLevel(logging.INFO)
    import bm25s  # noqa: F401, PLC0415 (it sets its logger to DEBUG on import; quiet it after)

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = eval_config(args)
    settings = EvalSettings(
        out_dir=args.out,
        workdir=args.workdir,
        store=args.store,
        store_options={"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {},
        lamp_dir=args.lamp_dir,
        tuning_users=args.tuning_users,
        reported_users=args.reported_users,
        methods=tuple(args.methods),
        rag_k=args.rag_k,
        max_new_tokens=args.eval_max_new_tokens,
        batch_size=args.eval_batch_size,
        n_resamples=args.n_resamples,
        seed=args.seed if args.seed is not None else 0,
        run_tag=args.run_tag,
        synth_run=args.synth_run,
        reuse_synthesis_from=args.reuse_synthesis_from,
        use_ray=args.ray,
        address=args.address,
        ablations=tuple(args.ablations),
        ablation_run=args.ablation_run,
        ablation_users=args.ablation_users,
        history_users=args.history_users,
        select_on_tuning=args.select_on_tuning,
        command="chameleon eval " + " ".join(shlex.quote(a) for a in _eval_argv()),
    )
    res = run_evaluation(settings, cfg)
    print(f"\n{res['n_users']} reported users, model {res['model']}")
    for m, e in res["methods"].items():
        vb = e.get("vs_base", {}).get("rougeL")
        rel = "" if not vb or vb["rel"] is None else f"  vs base {vb['rel'] * 100:+.1f} % (p={vb['p_bootstrap']:.3f})"
        print(f"  {m:26s} ROUGE-1 {e['rouge1']:.3f}  ROUGE-L {e['rougeL']:.3f}{rel}")
    g = res["goal"]
    if g.get("evaluated"):
        print(f"goal (group >= base +15 % ROUGE-L and > RAG, paired): {'met' if g['met'] else 'NOT met'}")
    print(f"report: {args.out}/report.md")
    return 0


def _eval_argv() -> list[str]:
    """The arguments after `eval` on this process's command line (for the report's reproduce line)."""
    argv = sys.argv[1:]
    if "eval" in argv:
        return argv[argv.index("eval") + 1 :]
    return argv
