"""The packages' layers, checked on the source: every import of every shipped .py file (module level,
inside functions and under ``if TYPE_CHECKING:`` alike; ``import a.b``, ``from a import b``, relative
imports resolved, and ``importlib.import_module("a.b")`` / ``__import__("a")`` with a literal name)
is mapped to its top-level package, and a package may import only its own modules, third-party ones
and the packages ALLOWED lists for it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Package -> the packages of ours it may import (besides itself). splitwise_core is the
#: ground floor; policies and cloud_offload stand on it alone; splitwise_device may use all of them.
ALLOWED: dict[str, frozenset[str]] = {
    "splitwise_core": frozenset(),
    "policies": frozenset({"splitwise_core"}),
    "cloud_offload": frozenset({"splitwise_core"}),
    "splitwise_device": frozenset({"splitwise_core", "policies", "cloud_offload"}),
    # Not shipped: the evaluation harness stands on the shipped packages, and the benches on both;
    # neither imports tests/ (tests/ import them: it is the top, nothing imports it).
    "evaluation": frozenset({"splitwise_core", "policies", "cloud_offload", "splitwise_device"}),
    "bench": frozenset({"splitwise_core", "policies", "cloud_offload", "splitwise_device", "evaluation", "training"}),
    # Not shipped either: the learned planner's training side (simulator, PPO) stands on the shipped
    # packages; what the device runs of it (the featurizer, the ONNX planner) lives in policies.
    "training": frozenset({"splitwise_core", "policies", "cloud_offload", "splitwise_device"}),
}
#: Ours but never shipped: no shipped package may import these.
UNSHIPPED = frozenset({"tests", "bench", "evaluation", "training"})
OURS = frozenset(ALLOWED) | UNSHIPPED

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # absolute dotted name, relative imports resolved ("" if it climbs above the top)


def module_name(root: Path, file: Path) -> list[str]:
    """``root/a/b/c.py`` -> ["a", "b", "c"]; ``root/a/b/__init__.py`` -> ["a", "b"]."""
    parts = list(file.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(root: Path, file: Path) -> Iterator[Import]:
    """Every import in `file` (anywhere in it), as absolute module names."""
    name = module_name(root, file)
    package = name if file.name == "__init__.py" else name[:-1]
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(file, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            elif node.level - 1 > len(package) - 1:
                base = ""  # climbs above the top-level package: always a violation
            else:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            yield Import(file, node.lineno, base)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id in {"__import__", "import_module"})
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            yield Import(file, node.lineno, node.args[0].value)


def python_files(root: Path, package: str) -> list[Path]:
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def layer_violations(root: Path, allowed: dict[str, frozenset[str]] = ALLOWED) -> list[str]:
    """``file:line: package A imports B (allowed: ...)`` for every import that breaks the layers."""
    ours = frozenset(allowed) | UNSHIPPED
    found = []
    for package, may_import in allowed.items():
        for file in python_files(root, package):
            for imp in imports(root, file):
                target = imp.module.split(".")[0]
                if target == package or (target and target not in ours) or target in may_import:
                    continue
                shown = imp.module or "a module above the top-level package"
                allowed_text = ", ".join(sorted(may_import)) or "nothing of ours"
                found.append(
                    f"{file.relative_to(root)}:{imp.line}: package {package} imports {shown} (allowed: {allowed_text})"
                )
    return found


def test_every_package_imports_only_the_layers_below_it() -> None:
    violations = layer_violations(ROOT)
    assert not violations, "layer violations:\n" + "\n".join(violations)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_the_walker_sees_each_real_package(package: str) -> None:
    files = python_files(ROOT, package)
    assert len(files) >= 3, f"only {len(files)} .py files under {package}/: is ROOT ({ROOT}) right?"
    assert sum(1 for f in files for _ in imports(ROOT, f)) > len(files), f"too few imports found in {package}/"


def test_the_checker_catches_planted_violations(tmp_path: Path) -> None:
    def write(relative: str, text: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    for package in ALLOWED:
        write(f"{package}/__init__.py", "")
    write(
        "policies/bad.py",
        "import numpy\nfrom splitwise_core import errors\n\n\n"
        "def f():\n    from splitwise_device import x\n    return x\n",
    )
    write("policies/sub/__init__.py", "")
    write("policies/sub/deep.py", "from .. import cost\nfrom ...cloud_offload import mqtt\n")
    write(
        "cloud_offload/worker.py",
        "import policies.planners\nimport importlib\nimportlib.import_module('evaluation.x')\n",
    )
    write("splitwise_core/__init__.py", "if True:\n    from tests.support import helpers\n")
    write("splitwise_device/agent.py", "from cloud_offload import worker\nfrom policies import cost\nimport bench\n")

    assert sorted(layer_violations(tmp_path)) == sorted(
        [
            "policies/bad.py:6: package policies imports splitwise_device (allowed: splitwise_core)",
            "policies/sub/deep.py:2: package policies imports a module above the top-level package "
            "(allowed: splitwise_core)",
            "cloud_offload/worker.py:1: package cloud_offload imports policies.planners (allowed: splitwise_core)",
            "cloud_offload/worker.py:3: package cloud_offload imports evaluation.x (allowed: splitwise_core)",
            "splitwise_core/__init__.py:2: package splitwise_core imports tests.support (allowed: nothing of ours)",
            "splitwise_device/agent.py:3: package splitwise_device imports bench "
            "(allowed: cloud_offload, policies, splitwise_core)",
        ]
    )


def test_relative_imports_resolve_against_the_package(tmp_path: Path) -> None:
    (tmp_path / "policies" / "sub").mkdir(parents=True)
    init = tmp_path / "policies" / "sub" / "__init__.py"
    init.write_text("from . import a\nfrom .b import c\nfrom .. import d\n", encoding="utf-8")
    module = tmp_path / "policies" / "sub" / "m.py"
    module.write_text("from . import a\nfrom .b import c\nfrom .. import d\nfrom .... import e\n", encoding="utf-8")
    assert [i.module for i in imports(tmp_path, init)] == ["policies.sub", "policies.sub.b", "policies"]
    assert [i.module for i in imports(tmp_path, module)] == ["policies.sub", "policies.sub.b", "policies", ""]
