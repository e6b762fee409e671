"""The shape of the code: no import cycles, no function in peftbench/ over 80 lines, no plugin importing another,
no branch on a task's kind outside the tasks, and a run's model assembled in one function.

The import graph is read from the source (``ast``), not from ``sys.modules``: every ``import`` and
``from ... import`` counts, at module level and inside functions (a function-level import still makes a cycle,
only a later one), except those under ``if TYPE_CHECKING:``, which never run. ``plugins/`` and ``tasks/`` are
read as the ``peftbench.plugins`` and ``peftbench.tasks`` packages they ship as.
"""

from __future__ import annotations

import ast
from pathlib import Path

from peftbench.task import GenerationTask, Task

REPO = Path(__file__).resolve().parent.parent
#: source folder -> the package it ships as (pyproject's package-dir)
PACKAGES = {"peftbench": "peftbench", "plugins": "peftbench.plugins", "tasks": "peftbench.tasks"}
MAX_FUNCTION_LINES = 80

# Known violations, allowed while they are being removed (none now: keep them empty).
#: import cycles, each as the sorted modules of one strongly connected component (WP-B: testing <-> conformance)
KNOWN_CYCLES: set[tuple[str, ...]] = set()
#: functions in peftbench/ over MAX_FUNCTION_LINES (WP-B: the trainer)
KNOWN_LONG_FUNCTIONS: set[str] = set()
#: plugins that import another plugin's package (WP-A: the LoRA toolkit)
KNOWN_CROSS_PLUGIN_IMPORTS: set[tuple[str, str]] = set()


def source_modules(repo: Path = REPO) -> dict[str, Path]:
    """Every module of the shipped packages: dotted name -> file."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = list(path.relative_to(repo / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]))
            continue
        yield from _import_nodes(node)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module`` (at ``path``) imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = ".".join(filter(None, [base if node.level else "", node.module or ""]))
            # `from pkg import x`: the submodule pkg.x where there is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found.update(t for t in targets if t in modules and t != module)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def long_functions(modules: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``module.qualname`` -> lines of every function (methods and nested ones included) of ``peftbench``
    itself (not its plugins or tasks) longer than ``limit`` lines, decorators not counted."""
    long = {}
    for module, path in modules.items():
        if module.startswith(("peftbench.plugins", "peftbench.tasks")):
            continue

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    lines = child.end_lineno - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and lines > limit:
                        long[name] = lines
                    walk(child, name)
                else:
                    walk(child, prefix)

        walk(ast.parse(path.read_text(), str(path)), module)
    return long


def cross_plugin_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """``(plugin, other plugin)`` for every module of a plugin package that imports another plugin's."""
    def plugin_of(module: str) -> str | None:
        parts = module.split(".")
        return ".".join(parts[:3]) if parts[:2] == ["peftbench", "plugins"] and len(parts) > 2 else None

    found = set()
    for module, targets in graph.items():
        mine = plugin_of(module)
        for target in targets:
            theirs = plugin_of(target)
            if mine and theirs and theirs != mine:
                found.add((mine, theirs))
    return found


#: where a task's kind may be compared with a name: the task base classes and the task plugins
KIND_OWNERS = ("peftbench.task", "peftbench.tasks")
#: the steps of building a run's model, each called from the one assembly function only
ASSEMBLY_STEPS = ("peftbench_inject", "freeze", "unfreeze_head", "trainable_to_fp32", "find_targets")
ASSEMBLY = "peftbench.assembly.assemble"
TASK_KINDS = {Task.kind, GenerationTask.kind}


_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _scopes(node: ast.AST, name: str):
    """``(qualname, node)`` of ``node`` and of every function and class defined in it, at any depth."""
    yield name, node
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, _DEFINITIONS):
            yield from _scopes(child, f"{name}.{child.name}")
        else:
            stack.extend(ast.iter_child_nodes(child))


def _own_nodes(node: ast.AST):
    """The nodes of ``node`` outside the functions and classes defined in it."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, _DEFINITIONS):
            yield child
            yield from _own_nodes(child)


def _names_a_kind(node: ast.AST) -> bool:
    """``x.kind``, or a call of a function named ``kind`` / ``..._kind`` (``task_kind(config, host)``)."""
    if isinstance(node, ast.Attribute):
        return node.attr == "kind"
    if isinstance(node, ast.Call):
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        return name == "kind" or name.endswith("_kind")
    return False


def _texts(node: ast.AST) -> set[str]:
    """The strings of a string constant, or of a tuple, list or set of them."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*map(_texts, node.elts)) if node.elts else set()
    return {node.value} if isinstance(node, ast.Constant) and isinstance(node.value, str) else set()


def kind_comparisons(modules: dict[str, Path]) -> list[str]:
    """``module:line`` of every comparison of a task's kind with a string outside :data:`KIND_OWNERS`: of
    ``x.kind`` (or ``..._kind(...)``) with any string, or of a variable ``kind`` with a task kind's name (a local
    ``kind`` compared with other strings is something else: a schema node's type, a message's)."""
    found = []
    for module, path in modules.items():
        if module in KIND_OWNERS or module.startswith(tuple(f"{m}." for m in KIND_OWNERS)):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            texts = set().union(*map(_texts, operands))
            named = any(isinstance(o, ast.Name) and o.id.endswith("kind") for o in operands)
            if (texts and any(map(_names_a_kind, operands))) or (named and texts & TASK_KINDS):
                found.append(f"{module}:{node.lineno}")
    return found


def assembly_calls(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each step of :data:`ASSEMBLY_STEPS` -> the functions (``module.qualname``) of the shipped packages that
    call it (``peftbench_inject`` through the hook: ``host.hook.peftbench_inject``)."""
    callers: dict[str, set[str]] = {step: set() for step in ASSEMBLY_STEPS}
    for module, path in modules.items():
        for name, function in _scopes(ast.parse(path.read_text(), str(path)), module):
            for node in _own_nodes(function):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                called = getattr(func, "attr", getattr(func, "id", None))
                if called == "peftbench_inject" and not (isinstance(func, ast.Attribute)
                                                         and getattr(func.value, "attr", None) == "hook"):
                    continue  # a plugin calling its own (or its base class's) implementation
                if called in callers:
                    callers[called].add(name)
    return callers


# -- the checks ------------------------------------------------------------------------------------------


def test_no_import_cycles():
    found = set(cycles(import_graph(source_modules())))
    assert not found - KNOWN_CYCLES, f"import cycles: {sorted(found - KNOWN_CYCLES)}"


def test_no_function_in_peftbench_is_longer_than_80_lines():
    found = {name: lines for name, lines in long_functions(source_modules()).items()
             if name not in KNOWN_LONG_FUNCTIONS}
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines: {found}"


def test_no_plugin_imports_another_plugin():
    found = cross_plugin_imports(import_graph(source_modules()))
    assert not found - KNOWN_CROSS_PLUGIN_IMPORTS, f"plugins importing other plugins: {sorted(found)}"


def test_no_kind_string_comparison_outside_the_tasks():
    """What differs by task kind is the task's (:class:`peftbench.task.Task`): no module branches on its name."""
    found = kind_comparisons(source_modules())
    assert not found, f"task kind compared with a string outside {', '.join(KIND_OWNERS)}: {found}"


def test_a_model_is_assembled_in_one_function():
    """Training, export, the conformance kit and budgets build a run's model with the one ``assemble``."""
    callers = assembly_calls(source_modules())
    assert callers == {step: {ASSEMBLY} for step in ASSEMBLY_STEPS}, callers


# -- the checks catch what they look for -----------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return source_modules(tmp_path)


def test_the_checks_find_planted_cycles_long_functions_and_cross_plugin_imports(tmp_path):
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    modules = _tree(tmp_path, {
        "peftbench/__init__.py": "",
        "peftbench/a.py": "from .b import f\n",
        "peftbench/b.py": f"def f():\n    from . import a\n{long_body}",  # a function-level import
        "peftbench/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import X\n",
        "peftbench/d.py": "import peftbench.c\n",
        "plugins/__init__.py": "",
        "plugins/one/__init__.py": "from ..two.layer import Layer\n",
        "plugins/one/util.py": "from . import helpers\nfrom .. import two\n",
        "plugins/one/helpers.py": "",
        "plugins/two/__init__.py": "",
        "plugins/two/layer.py": "import peftbench.a\n",
        "tasks/__init__.py": "",
    })
    graph = import_graph(modules)
    assert graph["peftbench.plugins.one.util"] == {"peftbench.plugins.one.helpers", "peftbench.plugins.two"}
    assert cycles(graph) == [("peftbench.a", "peftbench.b")]  # c <-> d only under TYPE_CHECKING: no cycle
    assert long_functions(modules) == {"peftbench.b.f": MAX_FUNCTION_LINES + 2}  # def, import, body
    assert cross_plugin_imports(graph) == {("peftbench.plugins.one", "peftbench.plugins.two")}


# -- one run record --------------------------------------------------------------------------------------


def _annotated_fields(path: Path, class_name: str) -> set[str]:
    """The annotated attributes of class ``class_name`` in ``path`` (read from the source: no torch import)."""
    (cls,) = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
              and node.name == class_name]
    return {node.target.id for node in cls.body if isinstance(node, ast.AnnAssign)}


def test_store_columns_are_the_run_records_fields(tmp_path):
    """The store's runs table is generated from :class:`peftbench.record.RunRecord`: same names, order and types,
    and no column list written by hand in the store; every result column the trainer's result provides."""
    import sqlite3

    from peftbench import record
    from peftbench.store import Store

    Store(tmp_path / "s.sqlite").close()
    found = [(row[1], row[2]) for row in sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA table_info(runs)")]
    assert found == [(f.name, f.metadata["sql"]) for f in record.columns()]
    assert "CREATE TABLE IF NOT EXISTS runs" not in (REPO / "peftbench" / "store.py").read_text()
    by_name = {f.name for f in record.columns() if f.metadata["result"] is True}
    assert by_name <= _annotated_fields(REPO / "peftbench" / "trainer.py", "RunResult")


def test_a_field_added_to_the_record_is_a_store_column_and_a_cost_column(tmp_path, monkeypatch):
    """Adding a cost is one field on the record: an existing store gets the column on open, a finished run
    writes it, ``table --cost`` (human and CSV), the report's comparison and the Pareto plots show it."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from peftbench import plots, record, report
    from peftbench.store import Store
    from peftbench.tables import build

    Store(tmp_path / "s.sqlite").close()  # a store made before the field existed

    @dataclass
    class Extended(record.RunRecord):
        energy_j: float = record.column("REAL", result=lambda result: 2.5 * result.train_s, header="energy J",
                                        fmt=lambda joules: f"{joules:,.0f}",
                                        cost=record.Cost("energy_kj", "energy", scale=1e-3, plot=("energy", "kJ")))

    monkeypatch.setattr(record, "RunRecord", Extended)
    result = SimpleNamespace(**{**{f.name: None for f in record.columns()}, "train_s": 1000.0, "step_times": []})
    fields = record.result_fields(result)
    assert fields["energy_j"] == 2500.0
    with Store(tmp_path / "s.sqlite") as store:
        store.claim("r0", {"sweep": "s", "label": "lora", "method": "lora", "task": "toy", "seed": 0, "spec": {},
                           "budget": {}})
        store.finish("r0", "done", {**fields, "best": {"accuracy": 0.5}, "final": {"accuracy": 0.5}})
        runs = store.runs()
    assert runs[0]["energy_j"] == 2500.0
    plain = build(runs, {"toy": "accuracy"}, "plain", baseline=None, cost=True)
    assert "energy J" in plain.splitlines()[0] and "2,500" in plain.splitlines()[2] and ", energy" in plain
    assert build(runs, {"toy": "accuracy"}, "csv", baseline=None).splitlines()[1].endswith(",2.5")
    assert "<th>energy J</th>" in report.table_section(runs, {"toy": "accuracy"})
    assert [panel[0] for panel in plots.pareto_panels()] == ["params", "memory", "step", "energy"]


def test_the_checks_find_planted_kind_branches_and_second_assemblies(tmp_path):
    modules = _tree(tmp_path, {
        "peftbench/__init__.py": "",
        "peftbench/task.py": "def f(task):\n    return task.kind == 'causal_lm'\n",  # the task base: allowed
        "peftbench/trainer.py": "def f(task, kind):\n    if kind == 'x':\n        pass\n"  # a local name: not a task's
                                "    if task.kind != 'classification':\n        pass\n"
                                "    return task_kind(task) in ('a', 'b')\n",
        "peftbench/modeling.py": "def load(kind='classification'):\n    return kind == 'causal_lm'\n",
        "peftbench/assembly.py": "def assemble(host, model):\n    host.hook.peftbench_inject(model=model)\n",
        "peftbench/export.py": "class A:\n    def rebuild(self, host, m):\n"
                               "        def inner():\n            modeling.trainable_to_fp32(m)\n"
                               "        host.hook.peftbench_inject(model=m)\n",
        "plugins/__init__.py": "",
        "plugins/one/__init__.py": "class M(Base):\n    def peftbench_inject(self, model):\n"
                                   "        return super().peftbench_inject(model)\n",
        "tasks/__init__.py": "def g(task):\n    return task.kind == 'x'\n",
    })
    assert sorted(kind_comparisons(modules)) == ["peftbench.modeling:2", "peftbench.trainer:4",
                                                      "peftbench.trainer:6"]
    callers = assembly_calls(modules)
    assert callers["peftbench_inject"] == {"peftbench.assembly.assemble", "peftbench.export.A.rebuild"}
    assert callers["trainable_to_fp32"] == {"peftbench.export.A.rebuild.inner"}
