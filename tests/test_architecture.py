"""The package's dependency rule, read from the source (so breaking it fails here).

    core ← data ← job ← evaluation;  serving uses core and data only;  dev sits beside job.

`config`, `flags` and `ray_env` (Ray's environment, without Ray) are leaves every layer may use. The rule holds for the
CLIs too (`serving/cli` uses core, data and the leaves). Ray is imported only by the job's Ray
driver, actor pools, serving's app and the CLIs; FastAPI and Starlette only by serving's
app. No import cycle, not even through imports made for type checking only.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chameleon"
JOBS = PACKAGE.parent / "jobs"

LEAVES = {"chameleon", "chameleon.config", "chameleon.flags", "chameleon.ray_env"}
ALLOWED = {  # package -> chameleon packages it may import (besides itself and the leaves)
    "core": set(),
    "data": {"core"},
    "job": {"core", "data"},
    "evaluation": {"core", "data", "job"},
    "serving": {"core", "data"},
    "dev": {"core", "data", "job"},
}
RAY_MODULES = {
    "chameleon.job.ray_input",
    "chameleon.job.ray_job",
    "chameleon.job.replicas",
    "chameleon.serving.app",
}
WEB_MODULES = {"chameleon.serving.app"}
CLI_MODULES = {"chameleon.cli", "chameleon.serving.cli", "chameleon.evaluation.cli"}
# Function-level imports of the package's own modules are allowed only where laziness is the point.
LAZY_OWN_IMPORTS = CLI_MODULES | {
    "chameleon",  # the public API loads on attribute access
    "chameleon.serving",  # `chameleon.serving:app_builder` without importing Ray at package import
    "chameleon.evaluation",
    "chameleon.job.drivers",  # the Ray driver is imported only when a Ray run is asked for
    "chameleon.core.fingerprint",  # the record is torch-free; the model is needed only to hash one
}
HEAVY_THIRD_PARTY = {
    "torch",
    "ray",
    "transformers",
    "matplotlib",
    "boto3",
    "botocore",
    "safetensors",
    "gguf",
    "moto",
}  # moto: the optional fallback S3 server
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, type_level: bool = False) -> list[tuple[str, bool]]:
    """(imported module, at module level?) of every import statement; TYPE_CHECKING blocks are
    skipped unless `type_level`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test) and not type_level:
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, top))
                found.extend((f"{child.module}.{a.name}", top) for a in child.names)
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, nested)

    visit(tree, True)
    return found


MODULES = _modules()
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}
TYPE_LEVEL_IMPORTS = {name: _imports(path, type_level=True) for name, path in MODULES.items()}


def _own(name: str) -> str | None:
    """The package module an imported name refers to (longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_layers_import_only_what_the_rule_allows():
    bad = []
    for module, imports in IMPORTS.items():
        layer = _layer(module)
        if layer is None:  # the package root and `chameleon.cli`, the top of every layer
            continue
        for name, _top in imports:
            target = _own(name)
            if target is None or target in LEAVES:
                continue
            if _layer(target) not in {layer, *ALLOWED[layer]}:
                bad.append(f"{module} imports {target}")
    assert not bad, "layering violations:\n" + "\n".join(sorted(set(bad)))


def test_leaves_import_no_layer():
    for leaf in ("chameleon.config", "chameleon.ray_env"):
        assert not [n for n, _ in IMPORTS[leaf] if _own(n) not in (None, leaf)], leaf
    assert {_own(n) for n, _ in IMPORTS["chameleon.flags"]} <= {None, "chameleon.config"}


def test_ray_and_web_frameworks_stay_in_their_modules():
    allowed_ray = RAY_MODULES | CLI_MODULES
    for module, imports in IMPORTS.items():
        roots = {name.split(".")[0] for name, _ in imports}
        if "ray" in roots:
            assert module in allowed_ray, f"{module} imports Ray"
        if roots & {"fastapi", "starlette"}:
            assert module in WEB_MODULES, f"{module} imports a web framework"


def test_no_import_cycles_even_at_type_level():
    graph = {
        m: {t for n, _ in imps if (t := _own(n)) and t != m and t != "chameleon"}
        for m, imps in TYPE_LEVEL_IMPORTS.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_sit_at_the_top_except_deliberately_lazy_ones():
    bad = []
    for module, imports in IMPORTS.items():
        for name, top in imports:
            if top:
                continue
            if _own(name) is not None and module not in LAZY_OWN_IMPORTS:
                bad.append(f"{module}: function-level import of {name}")
            elif _own(name) is None and name.split(".")[0] not in HEAVY_THIRD_PARTY | {"chameleon"}:
                bad.append(f"{module}: function-level import of {name} (not a heavy dependency)")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_module_is_over_the_size_limit():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert not {m: n for m, n in sizes.items() if n > MAX_LINES}


def test_every_subpackage_is_a_regular_package():
    for sub in ALLOWED:
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
    assert (PACKAGE / "__init__.py").is_file()


def _heavy_modules_after(code: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of `heavy` a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys\nprint('HEAVY', [m for m in {heavy!r} if m in sys.modules])\n"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next((x for x in out.stdout.splitlines() if x.startswith("HEAVY ")), None)
    assert line is not None, out.stdout[-500:]
    return ast.literal_eval(line.removeprefix("HEAVY "))


def test_help_imports_neither_torch_nor_ray():
    code = (
        "from chameleon.cli import build_parser\n"
        "for cmd in ([], ['personalize'], ['demo'], ['serve'], ['eval']):\n"
        "    try:\n"
        "        build_parser().parse_args([*cmd, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    assert _heavy_modules_after(code, ("torch", "ray", "transformers")) == []


def test_the_input_tasks_import_neither_torch_nor_transformers():
    """Ray Data's input tasks import `job.ray_input` in every worker that runs one: with torch and
    transformers behind it, each worker's start cost seconds (the input stage of a 1,000-user
    job took 17 s on 2 cores instead of 4)."""
    code = "import chameleon.job.ray_input"
    assert _heavy_modules_after(code, ("torch", "transformers", "safetensors")) == []


def _manifest_key_reads(path: Path) -> list[str]:
    """`x["key"]` / `x.get("key")` where x is a manifest: an expression ending in `manifest`
    (`reader.manifest`, `manifest`) or a name assigned from one (or from `committed_manifest(...)`)."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def is_manifest(expr: ast.AST, names: set[str]) -> bool:
        text = ast.unparse(expr)
        return (
            text.endswith("manifest")
            or text.split(".")[-1] == "manifest"
            or (isinstance(expr, ast.Name) and expr.id in names)
            or (isinstance(expr, ast.Call) and ast.unparse(expr.func).endswith("committed_manifest"))
        )

    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and is_manifest(node.value, set()):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_manifest(node.value, names):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and is_manifest(node.func.value, names)
        ):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_manifest_is_read_by_attribute_outside_its_module():
    """The manifest is a typed `RunManifest` (`chameleon.data.manifest`): no reader goes back to
    string keys, in the package or in the benchmarks."""
    paths = [
        p for p in [*PACKAGE.rglob("*.py"), *JOBS.rglob("*.py")] if p != PACKAGE / "data" / "manifest.py"
    ]
    bad = [hit for p in paths for hit in _manifest_key_reads(p)]
    assert not bad, "string-key reads of a manifest:\n" + "\n".join(bad)


def _sample(tmp_path: Path, code: str) -> Path:
    path = tmp_path / "sample.py"
    path.write_text(code)
    return path


def test_the_manifest_check_finds_string_key_reads(tmp_path):
    sample = _sample(
        tmp_path,
        "def f(reader, store):\n"
        "    a = reader.manifest['counts']\n"
        "    m = committed_manifest(store, 'r')\n"
        "    b = m['groups']\n"
        "    c = reader.manifest.get('config')\n"
        "    d = reader.manifest.counts.partitions\n",
    )
    assert [h.split(": ", 1)[1] for h in _manifest_key_reads(sample)] == [
        "reader.manifest['counts']",
        "m['groups']",
        "reader.manifest.get('config')",
    ]


def test_serving_has_one_decode_path():
    """The continuous engine is the only decode path: no static-batch decoder and no
    `@serve.batch` branch in the serving package (the reference decoder lives in tests/)."""
    found = []
    for module, path in MODULES.items():
        if not module.startswith("chameleon.serving"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "BatchDecoder":
                found.append(f"{module}: class BatchDecoder")
            if isinstance(node, ast.Name | ast.Attribute) and ast.unparse(node) in (
                "BatchDecoder",
                "serve.batch",
            ):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "a second decode path in serving:\n" + "\n".join(found)


# -- the serving seam: a typed request crosses the Ray handle; responses are protocol models ------

SERVING = PACKAGE / "serving"
RESPONSE_KEYS = {"choices", "object", "usage", "delta", "error"}
"""Keys that only OpenAI response bodies have (the replica's events are checked as `yield {…}`)."""
WIRE_WRITERS = {"JSONResponse", "sse_line", "json_bytes", "json_response"}


def _annotation(fn: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> str | None:
    for arg in fn.args.args:
        if arg.arg == name:
            return ast.unparse(arg.annotation) if arg.annotation is not None else None
    return None


def _handle_calls(path: Path) -> list[str]:
    """Every `….generate.remote(x)` of a module: fine when `x` is a parameter of the enclosing
    function annotated `GenerationRequest`; otherwise reported."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("generate.remote")):
                continue
            args = node.args
            typed = (
                len(args) == 1
                and not node.keywords
                and isinstance(args[0], ast.Name)
                and _annotation(fn, args[0].id) == "GenerationRequest"
            )
            if not typed:
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return bad


def _untyped_bodies(path: Path) -> list[str]:
    """Dict literals that look like response bodies or replica events (a key of `RESPONSE_KEYS`),
    dicts yielded as events, and dict literals handed to a wire writer."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if keys & RESPONSE_KEYS:
                found.append(f"{path.name}:{node.lineno}: dict with {sorted(keys & RESPONSE_KEYS)}")
        elif isinstance(node, ast.Yield) and isinstance(node.value, ast.Dict):
            found.append(f"{path.name}:{node.lineno}: yields a dict")
        elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in WIRE_WRITERS:
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Dict) or (
                isinstance(first, ast.Call) and ast.unparse(first.func) == "dict"
            ):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)} of a dict literal")
    return found


def test_a_typed_request_crosses_the_ray_handle():
    """The ingress hands the model replica a `GenerationRequest` (built once from the body), and
    the replica's entry points take one: no dict payload crosses the handle."""
    assert not _handle_calls(SERVING / "app.py")
    assert "generate.remote" in (SERVING / "app.py").read_text(), "the check looks at the real call"
    signatures = {
        (SERVING / "app.py", "generate"): "request",
        (SERVING / "replica.py", "events"): "request",
        (SERVING / "replica.py", "admit"): "request",
    }
    for (path, name), param in signatures.items():
        fns = [
            n
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
        ]
        assert fns and all(_annotation(f, param) == "GenerationRequest" for f in fns), (path.name, name)


def test_responses_and_events_are_typed_in_serving():
    """Response bodies are the models of `serving/protocol.py` and replica events the dataclasses
    of `serving/replica_api.py`: no module of the serving package writes either as a dict."""
    bad = [hit for p in sorted(SERVING.glob("*.py")) if p.name != "protocol.py" for hit in _untyped_bodies(p)]
    assert not bad, "untyped response bodies or events:\n" + "\n".join(bad)


def test_the_serving_seam_checks_find_what_they_look_for(tmp_path):
    sample = _sample(
        tmp_path,
        "async def start(self, payload: dict, request: GenerationRequest):\n"
        "    self.handle.generate.remote(payload)\n"
        "    self.handle.generate.remote(request)\n"
        "    yield {'type': 'start'}\n"
        "    body = {'id': rid, 'choices': []}\n"
        "    return JSONResponse({'status': 'ok'}), sse_line(dict(a=1))\n",
    )
    assert _handle_calls(sample) == ["sample.py:2: self.handle.generate.remote(payload)"]
    assert [h.split(": ", 1)[1] for h in _untyped_bodies(sample)] == [
        "yields a dict",
        "dict with ['choices']",
        "JSONResponse of a dict literal",
        "sse_line of a dict literal",
    ]
