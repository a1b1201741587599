"""The memforge package's modules import one another without a circle (read from the source, nothing imported).

Every import statement counts, inside functions too: a function-level import that closes a circle still runs
half-initialised modules against each other when that function is first called, and it hides the circle from
anyone reading the module's head. ``from X import y`` is an edge to ``X.y`` when that is a module, else to
``X``. A dotted import names only its last module: Python also runs the parent packages' ``__init__`` first,
but finding a parent already in ``sys.modules`` (even half-initialised) is harmless, so those implicit edges
are not circles and are not counted.
"""
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """Each package of the distribution and the folder it installs from (pyproject's setuptools package-dir)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    return {package: ROOT / folders[package] for package in setuptools["packages"]}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the packages (``__init__.py`` is the package)."""
    modules = {}
    for package, folder in package_dirs().items():
        for file in folder.glob("*.py"):
            modules[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return modules


def imported(module: str, file: Path, known: set[str]) -> list[tuple[str, int]]:
    """The memforge modules that ``module`` imports anywhere in ``file``, with each import's line."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        edges += [(target, node.lineno) for target in targets if target in known]
    return edges


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """module -> the modules it imports; (module, target) -> where (file:line)."""
    files = module_files()
    graph, where = {name: set() for name in files}, {}
    for name, file in files.items():
        for target, line in imported(name, file, set(files)):
            graph[name].add(target)
            where.setdefault((name, target), f"{file.relative_to(ROOT)}:{line}")
    return graph, where


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


@pytest.mark.unit
def test_the_package_has_no_import_cycle():
    graph, where = import_graph()
    assert {"memforge", "memforge.bench.run", "memforge.storage.fs"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b} at {where[a, b]}" for a, b in zip(cycle, cycle[1:]))


@pytest.mark.unit
def test_the_graph_sees_function_level_and_relative_imports_and_reports_a_cycle(tmp_path):
    """The reader of the test above, on a made-up package: an import inside a function closes the circle."""
    (tmp_path / "a.py").write_text("from memforge.pkg import b\n")
    (tmp_path / "b.py").write_text("def later():\n    from .c import helper\n")
    (tmp_path / "c.py").write_text("import memforge.pkg.a\nhelper = 1\n")
    (tmp_path / "__init__.py").write_text("from . import a\n")
    known = {"memforge.pkg", "memforge.pkg.a", "memforge.pkg.b", "memforge.pkg.c"}
    graph = {name: {target for target, _ in imported(name, tmp_path / f"{name.rpartition('.')[2]}.py", known)}
             for name in known - {"memforge.pkg"}}
    graph["memforge.pkg"] = {target for target, _ in imported("memforge.pkg", tmp_path / "__init__.py", known)}
    assert graph == {"memforge.pkg": {"memforge.pkg.a"}, "memforge.pkg.a": {"memforge.pkg.b"},
                     "memforge.pkg.b": {"memforge.pkg.c"}, "memforge.pkg.c": {"memforge.pkg.a"}}
    assert find_cycle(graph) == ["memforge.pkg.a", "memforge.pkg.b", "memforge.pkg.c", "memforge.pkg.a"]
    graph["memforge.pkg.c"] = set()
    assert find_cycle(graph) is None
