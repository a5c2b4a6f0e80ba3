"""The shape of the code base: every module imports, the project's imports form no circle (function-level imports
included, since a deferred import that hides a circle is still one), and the leaf modules stay leaves."""
import ast
import importlib
import subprocess
import sys

import pytest

from utils import REPO_ROOT

PACKAGES = sorted(p.parent.name for p in REPO_ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "bench"))
MODULES = sorted([p.stem for p in REPO_ROOT.glob("*.py")] + PACKAGES)
LEAVES = {"errors": set(), "resolve": {"errors"}}


def project_imports(module: str) -> set:
    """Names of this project's top-level modules (and packages) that `module` imports anywhere in its source."""
    files = sorted((REPO_ROOT / module).glob("*.py")) if module in PACKAGES else [REPO_ROOT / f"{module}.py"]
    found = set()
    for node in (node for file in files for node in ast.walk(ast.parse(file.read_text()))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {module}


def test_every_module_imports_in_a_fresh_interpreter():
    submodules = [f"{package}.{p.stem}" for package in PACKAGES for p in (REPO_ROOT / package).glob("*.py")]
    code = "; ".join(f"import {m}" for m in MODULES + submodules)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_project_imports_form_no_circle():
    graph = {m: project_imports(m) for m in MODULES}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        state[module] = "done"

    for module in MODULES:
        visit(module, [])


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaf_modules_import_nothing_else_of_the_project(leaf):
    assert project_imports(leaf) <= LEAVES[leaf]
    importlib.import_module(leaf)
