"""The import graph of the project's packages keeps its layers one-way (docs/design.md,
"Who imports whom"): every import of a project module counts, at module level and inside
functions (a function-level import still ties the two modules together), and so does a
``"package.module:attr"`` string that a command table or registry imports on use. Imports
under ``if TYPE_CHECKING:`` run only for type checkers and are left out."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("zoo", "datamodules", "callbacks", "launch")
SPEC = re.compile(r"^((?:%s)(?:\.\w+)*):\w+$" % "|".join(PACKAGES))  # "launch.sweep:main"

# zoo/base.py imports zoo.weights (create(weights=...)) and zoo/weights/api.py imports zoo.base
# (load() builds the model): the circle that making zoo.weights pure state-dict I/O removes.


def _modules(repo: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((repo / pkg).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _nodes(tree: ast.AST):
    """Every node, except what sits under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def imports_of(name: str, path: Path, is_pkg: bool, known) -> list[tuple[str, list[str]]]:
    """(project module imported, the names taken from it) for each import in ``path``."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(here[:len(here) - node.level + 1] + [node.module] * bool(node.module)) if node.level \
                else node.module
            names = []
            for a in node.names:
                if f"{mod}.{a.name}" in known:  # from zoo import augment: the submodule
                    found.append((f"{mod}.{a.name}", []))
                else:
                    names.append(a.name)
            if names and mod in known:
                found.append((mod, names))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SPEC.match(node.value):
            mod = SPEC.match(node.value).group(1)
            if mod in known:
                found.append((mod, []))
    return found


def import_graph(repo: Path = REPO) -> dict[str, dict[str, list[str]]]:
    """module -> {project module it imports: names taken from it}."""
    mods = _modules(repo)
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in mods}
    for m, (path, is_pkg) in mods.items():
        for target, names in imports_of(m, path, is_pkg, mods):
            if target != m:
                graph[m].setdefault(target, []).extend(names)
    return graph


def cycles(graph: dict[str, dict], skip: set[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan,
    iterative), leaving out the edges in ``skip``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if (v, w) in skip:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _edges(graph):
    return [(a, b, names) for a, targets in graph.items() for b, names in targets.items()]


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_imports_at_every_depth_and_by_string(graph):
    assert "zoo.registry" in graph["zoo.resnet"]  # module level, relative
    assert "zoo.augment.kernels" in graph["zoo.augment.masked"]  # from . import kernels
    assert "launch.sweep.train" in graph["launch.sweep.command"]  # inside a function
    assert "launch.sweep" in graph["launch.cli"]  # the command table's "launch.sweep:main"
    assert "datamodules.imagenet" not in graph["datamodules.backends"]  # under TYPE_CHECKING only


def test_no_import_cycles(graph):
    """No circle between any two modules of the project."""
    assert cycles(graph) == []


def test_zoo_and_datamodules_never_import_each_other(graph):
    crossing = [(a, b) for a, b, _ in _edges(graph) if {_top(a), _top(b)} == {"zoo", "datamodules"}]
    assert crossing == []


def test_nothing_imports_launch(graph):
    assert [(a, b) for a, b, _ in _edges(graph) if _top(b) == "launch" and _top(a) != "launch"] == []


def test_models_and_data_run_without_callbacks(graph):
    """callbacks/ may use zoo/ (ensemble members); zoo/ and datamodules/ import no callback."""
    assert [(a, b) for a, b, _ in _edges(graph) if _top(b) == "callbacks" and _top(a) in ("zoo", "datamodules")] == []
    assert [(a, b) for a, b, _ in _edges(graph) if _top(a) == "callbacks" and _top(b) == "datamodules"] == []


def _private_crossings(graph) -> list[tuple[str, str, str]]:
    return sorted({(a, b, n) for a, b, names in _edges(graph) if _top(a) != _top(b) for n in names if n.startswith("_")})


def test_no_private_name_crosses_packages(graph):
    """A name another package needs is public (or the code moves): ``from zoo.x import _y`` across
    packages is refused."""
    assert _private_crossings(graph) == []


LIGHTNING_OBJECTS = ("trainer", "strategy", "launcher", "accelerator")  # pl_module is the project's own model


def _lightning_private_uses(path: Path, root: Path = REPO) -> list[str]:
    """``<trainer|strategy|...>._name``: a private attribute of a Lightning object (by the name it is
    reached through), read or written; dunders and the project's own objects' names aside."""
    hits, text = [], path.read_text()
    for node in ast.walk(ast.parse(text, str(path))):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
        if owner in LIGHTNING_OBJECTS:
            hits.append(f"{path.relative_to(root)}:{node.lineno} {owner}.{node.attr}")
    # getattr(trainer.strategy, "_x"): the same through a string
    hits += [f"{path.relative_to(root)} getattr(.., {m!r})" for m in
             re.findall(r"getattr\([\w.]*(?:%s), \"(_[a-z]\w*)\"" % "|".join(LIGHTNING_OBJECTS), text)]
    return hits


def test_no_private_lightning_attribute_is_used():
    """Lightning's private attributes (``trainer._logger_connector``, ``strategy._start_method``)
    change without notice between releases: the project reads public ones."""
    found = [h for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) for h in _lightning_private_uses(p)]
    assert found == []


def test_the_private_lightning_scan_finds_one(tmp_path):
    (tmp_path / "m.py").write_text("def f(trainer, self):\n    trainer._logger_connector.x = 1\n"
                                   "    y = getattr(trainer.strategy, \"_start_method\", None)\n"
                                   "    return self.trainer.strategy._launcher, self._own, trainer.__class__\n")
    assert _lightning_private_uses(tmp_path / "m.py", tmp_path) == [
        "m.py:2 trainer._logger_connector", "m.py:4 strategy._launcher", "m.py getattr(.., '_start_method')"]
