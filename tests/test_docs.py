"""The docs say what the code does: commands parse, metric names are the exported ones, the output
layout is the one a run writes, `serve --help` covers every serving setting."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from chameleon.cli import build_parser
from chameleon.serving.metrics import DEFINITIONS, PROMETHEUS_PREFIX, prometheus_series

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLUSTER_README = ROOT / "cluster" / "README.md"
DASHBOARD = ROOT / "cluster" / "grafana-dashboard.json"

# How a documented command line starts -> the `chameleon` subcommand its arguments belong to.
ENTRYPOINTS = {
    "chameleon": None,
    ".venv/bin/chameleon": None,
    "jobs/personalize.py": "personalize",
    "jobs/evaluate.py": "eval",
}


def shell_lines(text: str) -> list[str]:
    """Lines of the fenced code blocks (continuations joined) and the inline code spans."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return lines


def documented_commands(path: Path) -> list[list[str]]:
    """Each `chameleon ...` / `python jobs/X.py ...` command of a doc, as `chameleon` argv:
    comments dropped, `<placeholder>` and `N` -> 1, `[optional parts]` kept without brackets, `...` dropped."""
    found = []
    for line in shell_lines(path.read_text()):
        line = line.split(" #", 1)[0]
        line = re.sub(r"<[^>]*>", "X", line).replace("[", " ").replace("]", " ")
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            run = (
                i > 0 and tokens[i - 1] in ("python", "python3")
                if tok.endswith(".py")
                else i + 1 < len(tokens)
            )
            if tok in ENTRYPOINTS and run:
                sub = ENTRYPOINTS[tok]
                # `N`, `G`, `ID`, `<placeholder>`: usage-style placeholders stand for a value.
                rest = tokens[i + 1 :]
                args = [re.sub(r"^[A-Z]+$", "1", t) for t in rest if t not in ("...", "…")]
                if sub is None and (not args or args[0].startswith("-") or args[0] == "on"):
                    break  # prose ("chameleon on Ray"), not a command
                argv = ([sub] if sub else []) + args
                # A sketch (`...`) or a bare `chameleon forget` names a command: its options are checked.
                found.append((argv, "..." in rest or "…" in rest or len(argv) == 1))
                break
    return found


def subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("doc", [README, CLUSTER_README], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documented_commands_parse(doc):
    """Whole commands parse; a sketch with `...` uses only options its command has."""
    commands = documented_commands(doc)
    assert len(commands) >= 5, f"found only {commands} in {doc}"
    parser = build_parser()
    for argv, elided in commands:
        if elided:
            known = subparser(argv[0])._option_string_actions
            unknown = [t for t in argv[1:] if t.startswith("-") and t.split("=")[0] not in known]
            assert not unknown, f"{doc.name}: `chameleon {' '.join(argv)}`: no such option {unknown}"
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc.name}: `chameleon {' '.join(argv)}` does not parse")


def test_cluster_readme_documents_forget():
    """`chameleon forget` exists; the operator's guide shows it (and does not say it is missing)."""
    text = CLUSTER_README.read_text()
    subs = {argv[0] for argv, _ in documented_commands(CLUSTER_README)}
    assert {"forget", "serve", "personalize"} <= subs, subs
    assert "not available" not in text.lower() and "no `chameleon forget`" not in text


def test_readme_metric_names_are_the_exported_names():
    """Every serving metric, under the name Prometheus shows, in the README; no bare names."""
    text = README.read_text()
    words = set(re.findall(r"\b(?:ray_)?chameleon_[a-z_]+\b", text))
    # Metric mentions (evaluation method names such as `chameleon_group` are not metrics).
    names = {w for w in words if any(w.removeprefix(PROMETHEUS_PREFIX).startswith(n) for n in DEFINITIONS)}
    assert all(n.startswith(PROMETHEUS_PREFIX) for n in names), sorted(
        n for n in names if not n.startswith("ray_")
    )
    exported = {s for name in DEFINITIONS for s in prometheus_series(name)}
    histograms = {PROMETHEUS_PREFIX + n for n, (kind, _, _) in DEFINITIONS.items() if kind == "histogram"}
    assert names <= exported | histograms, sorted(names - exported - histograms)
    for name in DEFINITIONS:  # each metric documented, as a series or (histograms) its base name
        assert set(prometheus_series(name)) & names or PROMETHEUS_PREFIX + name in names, name


def test_prometheus_series_names():
    assert prometheus_series("chameleon_generated_tokens") == ("ray_chameleon_generated_tokens_total",)
    assert prometheus_series("chameleon_running_requests") == ("ray_chameleon_running_requests",)
    assert prometheus_series("chameleon_batch_size")[0] == "ray_chameleon_batch_size_bucket"


def test_grafana_dashboard_queries_only_metrics_the_replicas_export():
    dash = json.loads(DASHBOARD.read_text())
    exported = {s for name in DEFINITIONS for s in prometheus_series(name)}
    queried = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\bray_chameleon_[a-z_]+\b", target["expr"]))
    for var in dash["templating"]["list"]:
        queried |= set(re.findall(r"\bray_chameleon_[a-z_]+\b", json.dumps(var)))
    assert queried and queried <= exported, sorted(queried - exported)
    # Every metric is on the dashboard (one of its series at least).
    assert all(set(prometheus_series(name)) & queried for name in DEFINITIONS), sorted(
        name for name in DEFINITIONS if not set(prometheus_series(name)) & queried
    )


# Settings without a flag of their own: the one with a switch.
NOT_FLAGS = {"allow_unauthenticated"}


def test_serve_help_has_a_flag_for_every_setting_and_no_static_path():
    from chameleon.config import ModelConfig
    from chameleon.serving.cli import SERVE_FLAGS
    from chameleon.serving.config import ServeConfig

    settings = {f.setting for f in SERVE_FLAGS}
    want = {n for n in ServeConfig.model_fields if n != "model"} - NOT_FLAGS
    want |= {f"model.{n}" for n in ModelConfig.model_fields}
    assert want <= settings, sorted(want - settings)
    assert settings <= want, sorted(settings - want)
    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "serve")[
        1
    ]
    text = serve.format_help()
    assert "--allow-unauthenticated" in text and not re.search(r"--engine(?![\w-])", text)
    assert "serve.batch" not in text and "batch waits" not in text
    args = serve.parse_args(["--store", "/s", "--no-log-requests", "--trust-remote-code"])
    assert args.log_requests is False and args.trust_remote_code is True


def layout_patterns(text: str) -> list[re.Pattern]:
    """The documented output layout (cluster/README.md) as patterns over object keys."""
    block = text[text.index("## Where the outputs go") :]
    block = block[block.index("```") + 3 :]
    block = block[: block.index("```")]
    pats = []
    for line in block.strip().splitlines():
        path = line.split()[0].removeprefix("<store>/")
        rx = re.escape(path)
        rx = re.sub(r"<[a-z_]+>", "[^/]+", rx.replace(r"\<", "<").replace(r"\>", ">"))
        rx = rx.replace("part\\-K", r"part-\d+").replace("shard\\-S", r"shard-\d+")
        pats.append(re.compile(rx + "$"))
    return pats


@pytest.mark.job
def test_documented_output_layout_is_what_a_run_writes(published_tiny_run):
    store, _manifest, _model = published_tiny_run
    patterns = layout_patterns(CLUSTER_README.read_text())
    keys = store.list("")
    assert any(k.startswith("runs/") and "/attempts/" in k for k in keys)
    undocumented = [k for k in keys if not any(p.match(k) for p in patterns)]
    assert not undocumented, undocumented
    unseen = [p.pattern for p in patterns if not any(p.match(k) for k in keys)]
    assert not unseen, f"documented but not written by a run: {unseen}"
