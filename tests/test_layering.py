"""The layers the README draws, kept: the core knows no Lightning, and imports point one way only.

``speechllm`` (pure PyTorch) <- ``datamodules`` <- ``lightning_modules`` <- ``stages`` (entry points).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}
# Each top-level package: the project packages it may import besides itself, and whether Lightning.
LAYERS: dict[str, tuple[set[str], bool]] = {
    "speechllm": (set(), False),
    "datamodules": ({"speechllm"}, True),
    "lightning_modules": ({"speechllm", "datamodules"}, True),
    "stages": ({"speechllm", "datamodules", "lightning_modules"}, True),
}
PROJECT = set(LAYERS) | {"tests"}


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level package -> first line importing it, for every import in the file (lazy ones too)."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:  # relative imports stay inside their own package
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def test_each_package_imports_only_the_layers_below_it():
    wrong = []
    for package, (allowed, lightning) in LAYERS.items():
        assert modules(package), f"no modules found in {package}/"
        for path in modules(package):
            for name, line in imported_packages(path).items():
                if (name in PROJECT and name not in allowed | {package}) or (name in LIGHTNING and not lightning):
                    wrong.append(f"{path.relative_to(REPO)}:{line}: imports {name}")
    assert not wrong, "imports against the layering (speechllm <- datamodules <- lightning_modules <- stages):\n" + "\n".join(wrong)


_IMPORT_CORE = """
import importlib, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import lightning` now raises ImportError; find_spec returns None
failed = []
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except Exception as err:
        failed.append(f"{{module}}: {{type(err).__name__}}: {{err}}")
loaded = sorted({{m.split(".")[0] for m, v in sys.modules.items() if v is not None}} & {outside!r})
if loaded:
    failed.append(f"importing the core loaded {{loaded}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_the_core_imports_without_lightning():
    names = [module_name(p) for p in modules("speechllm")]
    script = _IMPORT_CORE.format(blocked=sorted(LIGHTNING), modules=names, outside=PROJECT - {"speechllm"})
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the core needs Lightning or an outer layer:\n{done.stdout}{done.stderr[-3000:]}"
