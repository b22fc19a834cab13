"""The commands: every [project.scripts] entry is installed and callable, its --help works as a real command,
and each script in tools/ (and run_stream.py) is a thin shim over one of them that leaves sys.path alone."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
SHIMS = sorted((REPO / "tools").glob("*.py")) + [REPO / "run_stream.py"]
NEEDS_TORCH = ("engines.export",)  # the export side imports torch at module level; the runtime never does


def _needs_missing_torch(target: str) -> bool:
    return target.startswith(NEEDS_TORCH) and importlib.util.find_spec("torch") is None


def _command(name: str) -> str:
    """The installed executable: in this interpreter's scripts folder, else wherever PATH has it."""
    beside = Path(sysconfig.get_path("scripts")) / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e . (after editing [project.scripts])"
    return found


def test_every_script_entry_is_installed_and_resolves_to_a_callable() -> None:
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    for name, target in SCRIPTS.items():
        assert installed.get(name) == target, f"{name} installed as {installed.get(name)!r}: pip install -e ."
        if _needs_missing_torch(target):
            continue
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_every_installed_command_answers_help() -> None:
    runs = {name: subprocess.Popen([_command(name), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=REPO)
            for name, target in SCRIPTS.items() if not _needs_missing_torch(target)}
    for name, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{name} --help: {err}"
        assert out.startswith("usage: "), f"{name} --help printed {out[:80]!r}"


@pytest.mark.parametrize("path", SHIMS, ids=lambda p: p.name)
def test_each_script_is_a_thin_shim_of_an_installed_command(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and any(alias.name == "main" for alias in node.names)]
    assert len(imports) == 1, f"{path.name}: expected one 'from <module> import main'"
    assert f"{imports[0].module}:main" in SCRIPTS.values(), f"{path.name}: {imports[0].module} is no command"
    assert ast.get_docstring(tree), f"{path.name}: no docstring"
    assert len(path.read_text().splitlines()) <= 20, f"{path.name}: logic belongs in the packages"


@pytest.mark.parametrize("path", SHIMS, ids=lambda p: p.name)
def test_no_script_touches_sys_path(path: Path) -> None:
    tree = ast.parse(path.read_text())
    touched = [node.lineno for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr == "path"
               and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert not touched, f"{path.name} uses sys.path (line {touched[0]}): install the project instead"
    assert "noqa: E402" not in path.read_text()
