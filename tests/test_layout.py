"""The house rules of the code base, checked from the source (docs/architecture.md).

1. Layering: a folder imports only folders below it (kernel -> adapters -> edge_export ->
   client | server -> simulations -> CLI); client and server never import each other.
2. No import circles between modules, lazy (function-level) imports included.
3. One import namespace: every package folder is mapped into ``edgetune`` by pyproject.toml.
4. One of each: the label-position loss, the atomic writer, the ``--set`` parser and the
   resumable keys are each defined once.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("adapters", "client", "server", "edge_export", "simulations")  # top-level folders mapped into edgetune

# Floor of each room; a module may import only rooms on a lower floor, or its own room.
FLOORS = {"kernel": 0, "adapters": 1, "edge_export": 2, "client": 3, "server": 3, "simulations": 4, "cli": 5}


def _package_dirs() -> dict[str, str]:
    """pyproject's package -> folder map (``edgetune.server`` -> ``server``)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def _module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the ``edgetune`` namespace."""
    files: dict[str, Path] = {}
    for package, folder in _package_dirs().items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if package == "edgetune" and parts[0] in FOLDERS:
                continue
            name = ".".join([package, *parts]).removesuffix(".__init__")
            files[name] = path
    return files


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    if len(parts) > 1 and parts[1] == "cli":
        return "cli"
    return "kernel"


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports at run time, anywhere in the file (lazy imports too)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def test_every_package_folder_is_in_the_namespace() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in _module_files().items() if path.name == "__init__.py"}
    assert on_disk == listed


def test_no_folder_imports_a_folder_above_it() -> None:
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            here, there = _room(module), _room(target)
            if FLOORS[there] > FLOORS[here] or (here != there and FLOORS[there] == FLOORS[here]):
                bad.append(f"{module} ({here}) -> {target} ({there})")
    assert bad == []


def test_no_import_circles() -> None:
    graph, index, low, stack, on_stack, circles = _graph(), {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []


def _definitions(pattern: str) -> list[str]:
    hits = []
    for path in _module_files().values():  # the package's own sources (no build/ copies, no tests)
        hits += [f"{path.relative_to(ROOT)}:{m.group(0)}" for m in re.finditer(pattern, path.read_text(), re.M)]
    return hits


def test_one_definition_of_each_shared_rule() -> None:
    assert _definitions(r"^def summed_loss\b") == ["edgetune/lm.py:def summed_loss"]
    assert _definitions(r"^def label_logits\b") == ["edgetune/lm.py:def label_logits"]
    assert _definitions(r"^def pad_id\b") == ["edgetune/lm.py:def pad_id"]
    assert _definitions(r"^def atomic_write\b") == ["edgetune/fileio.py:def atomic_write"]
    # Files are replaced only by the atomic writer; the other two renames publish a whole folder
    # (a converted model, a distillation checkpoint) whose files are already on disk.
    assert sorted(_definitions(r"os\.replace\(|\.replace\(dest\)")) == [
        "edgetune/fileio.py:os.replace(",
        "edgetune/models.py:os.replace(",
        "server/distill/checkpoint.py:os.replace(",
    ]
    assert _definitions(r"^def parse_overrides\b") == ["edgetune/config.py:def parse_overrides"]
    assert _definitions(r"^RESUMABLE_KEYS\b") == ["edgetune/config.py:RESUMABLE_KEYS"]
    assert _definitions(r"^StateDict = ") == ["edgetune/types.py:StateDict = "]
    assert _definitions(r"^IGNORE_INDEX = ") == ["edgetune/chat.py:IGNORE_INDEX = "]


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    """A non-editable build holds ``edgetune`` (server/, client/, ... inside it) and nothing else."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("edgetune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"edgetune"}
    for folder in FOLDERS:
        assert f"edgetune/{folder}/__init__.py" in names
