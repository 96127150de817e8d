"""The house rules, checked on the source: no import cycles, the layers point one way, and the
light CLI commands stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("labelfoundry", "storage", "tasks", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at module level or inside a function (lazy imports
    run too), resolved to the module itself (`from pkg import sub` -> pkg.sub when that is a module)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a non-module attribute: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_project_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


STORAGE_MAY_IMPORT = {"labelfoundry.atomic", "labelfoundry.label_arrays"}


def test_the_core_helpers_storage_imports_are_torch_free():
    """A reader job installs storage without torch: what it imports from the core must not pull it in."""
    for mod in STORAGE_MAY_IMPORT:
        path = ROOT / (mod.replace(".", "/") + ".py")
        assert not {n.split(".")[0] for n in _third_party(path)} & {"torch", "kornia", "lpips", "faiss"}, path


def test_layers_point_one_way():
    """flows -> tasks -> labelfoundry <- storage: the core never imports prefect, tasks, flows or
    storage; storage imports only the core's torch-free helpers (atomic writes, label array names)."""
    graph = import_graph()
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        if top == "labelfoundry":
            assert not {d.split(".")[0] for d in deps} & {"tasks", "flows", "storage"}, mod
        if top == "storage":
            assert {d for d in deps if not d.startswith("storage")} <= STORAGE_MAY_IMPORT, mod
        if top == "tasks":
            assert not any(d.startswith("flows") for d in deps), mod
    for path in (ROOT / "labelfoundry").rglob("*.py"):
        assert "prefect" not in {n.split(".")[0] for n in _third_party(path)}, path


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_storage_writer_and_reader_meet_only_through_the_format():
    graph, paths = import_graph(), _modules()
    readers, writer = {"storage.dataset", "storage.reader"}, "storage.store"
    assert not _reachable(graph, writer) & readers
    for r in readers:
        assert writer not in _reachable(graph, r), r
    uses_zarr = {m for m in graph if any(n.split(".")[0] == "zarr" for n in _third_party(paths[m]))}
    assert uses_zarr == {"storage.zarr_io"}, "all zarr access goes through storage.zarr_io"


def _third_party(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("argv", [["verify", "--help"], ["show", "--help"], ["--help"]])
def test_light_cli_commands_import_neither_torch_nor_kornia(argv):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flows.cli import app\n"
        f"r = CliRunner().invoke(app, {argv!r})\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'kornia') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
