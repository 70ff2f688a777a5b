"""The package layers and the one list of names: what imports what (and what starts without torch),
and every table keyed by a config value holds exactly the schema's choices for it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Set

import pytest

from cvnets.mobilevit import VARIANTS
from cvnets.resnet import DEPTHS, STEMS
from data.samplers import BATCH_RULES
from engine.export import EXTENSIONS
from loss_fn.distillation import TERMS
from options.schema import literal_choices

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cvnets", "data", "engine", "loss_fn", "optim", "options", "tools", "utils")


def imported_modules(package: str) -> Set[str]:
    """Every module that any module of `package` imports by its absolute name."""
    found: Set[str] = set()
    for path in (REPO / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
    return found


# What each layer may import; the models and the data pipeline are siblings.
ALLOWED = {
    "utils": set(),
    "options": {"utils"},
    "cvnets": {"options", "utils"},
    "data": {"options", "utils"},
    "loss_fn": {"options", "utils"},
    "optim": {"options", "utils"},
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    packages = {module.split(".")[0] for module in imported_modules(package)}
    assert packages & set(PACKAGES) - {package} <= ALLOWED[package]


@pytest.mark.parametrize("package", ["optim", "loss_fn"])
def test_package_depends_on_the_schema_not_on_the_config_loader(package):
    # Library code raises ValueError; only the front door makes ConfigErrors.
    modules = imported_modules(package)
    assert "options.schema" in modules and "options.config" not in modules


@pytest.mark.parametrize("table, key", [
    (VARIANTS, "model.mobilevit.mode"),
    (DEPTHS, "model.resnet.depth"),
    (STEMS, "model.resnet.stem"),
    (BATCH_RULES, "sampler.vbs.batch_rule"),
    (EXTENSIONS, "export.format"),
    (TERMS, "loss.distillation.kind"),
])
def test_every_table_keyed_by_a_config_value_holds_exactly_its_choices(table, key):
    assert sorted(map(str, table)) == sorted(map(str, literal_choices(key)))


# Modules that start without torch, paying none of its seconds of import time: config errors come
# back at once, and `python -m data.fake` writes JPEGs only.
@pytest.mark.parametrize("modules", ["options, options.cli, options.config", "data.fake"])
def test_modules_that_need_no_torch_do_not_import_it(modules):
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


FRONT_DOORS = {"engine/commands.py"}  # turns errors into one line and an exit status


def _is_main_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


@pytest.mark.parametrize("package", ["cvnets", "data", "engine", "loss_fn", "optim", "utils"])
def test_library_code_raises_and_never_exits(package):
    """Library code raises ValueError/TypeError (or its own errors); only the entry points know
    ConfigError, print one line and choose an exit status."""
    offenders = []
    for path in sorted((REPO / package).glob("*.py")):
        if str(path.relative_to(REPO)) in FRONT_DOORS:
            continue
        tree = ast.parse(path.read_text(), str(path))
        tree.body = [n for n in tree.body if not _is_main_block(n)]  # `python -m module`: an entry point
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in ("ConfigError", "SystemExit", "exit"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert offenders == []
