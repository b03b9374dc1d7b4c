"""The floor plan of docs/architecture.md, checked on the source so it stays true: which
package may import which, no import circle, no dispatch by strings, sizes."""

import ast
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
THIRD_PARTY = {"zmq", "psutil", "structlog", "sqlite_utils", "rich", "blake3", "orjson",
               "prometheus_client", "nbd", "sanlock"}

# What every process shares: imports nothing else of ours.
SHARED = ["agent", "agent.errors", "agent.logs", "agent.config", "agent.system", "agent.ids"]
# Each package (by prefix) and the packages of ours it may import, besides itself.
MAY_IMPORT = {
    "agent.storage": SHARED,
    "workers": SHARED + ["agent.storage"],
    "agent.wire": SHARED,
    "agent.api": SHARED + ["agent.wire", "agent.supervisor.jobs", "agent.supervisor.states",
                           "agent.supervisor.recovery", "agent.supervisor.stats"],
    # The loop's one storage function: a domain's usage, read in a reader thread (metrics).
    "agent.supervisor": SHARED + ["agent.wire", "agent.api", "workers.protocol",
                                  "agent.storage.usage"],
    "agent.client": [],
    "agent.cli": SHARED + ["agent.client", "agent.supervisor.loop", "agent.supervisor.copies",
                           "agent.wire.security", "agent.wire.transport"],
}


def modules() -> dict[str, Path]:
    """Every module of agent/ and workers/ by dotted name (a package by its own name)."""
    out = {}
    for base in ("agent", "workers"):
        for p in sorted((REPO / base).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(path: Path, name: str | None = None, typing_too: bool = True) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included); with
    typing_too=False, not those under `if TYPE_CHECKING:` (they never run)."""
    tree = ast.parse(path.read_text())
    skip = set()
    if not typing_too:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def ours(found: set[str], known: dict) -> set[str]:
    """The modules of ours among `found`: `from agent.supervisor import states` names
    agent.supervisor.states, not the package it is found in."""
    hits = {m for m in found if m in known}
    return {m for m in hits if not (known[m].name == "__init__.py"
                                    and any(h.startswith(m + ".") for h in hits))}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offenders(known: dict, rules: dict) -> dict:
    bad = {}
    for name, path in known.items():
        owner = max((p for p in rules if in_package(name, p)), key=len, default=None)
        if owner is None:
            continue
        allowed = [owner, *rules[owner]]
        wrong = sorted(m for m in ours(imports(path, typing_too=False), known)
                       if not any(in_package(m, a) if a not in SHARED else m == a
                                  for a in allowed))
        if wrong:
            bad[name] = wrong
    return bad


def test_each_package_imports_only_what_its_floor_may():
    assert offenders(modules(), MAY_IMPORT) == {}


def test_what_every_process_shares_imports_nothing_else_of_ours():
    known = modules()
    bad = {m: sorted(ours(imports(known[m]), known) - set(SHARED)) for m in SHARED}
    assert {m: v for m, v in bad.items() if v} == {}


def test_storage_and_workers_never_import_zmq_but_for_the_worker_protocol():
    known = modules()
    bad = {n: "zmq" for n, p in known.items()
           if (in_package(n, "agent.storage") or in_package(n, "workers.ops"))
           and any(in_package(m, "zmq") for m in imports(p))}
    assert bad == {}


@pytest.mark.parametrize("module", ["agent.supervisor.tasks", "agent.supervisor.states"])
def test_tasks_and_states_import_only_the_standard_library(module):
    path = modules()[module]
    others = {m for m in imports(path) if m.split(".")[0] not in STDLIB}
    assert others <= {"agent.supervisor", "agent.supervisor.states"}, others


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def import_graph(known: dict) -> dict[str, set[str]]:
    """Who imports whom, as it runs (TYPE_CHECKING imports left out; a module's import of its
    own ancestor package is Python's, not an arrow of ours)."""
    return {n: {m for m in ours(imports(p, n, typing_too=False), known)
                if m != n and not in_package(n, m)} for n, p in known.items()}


def test_no_import_circle():
    assert cycles(import_graph(modules())) == []


def test_no_dispatch_by_strings():
    """Ops and namespaces are imported functions and modules: `go to definition` works, and
    nothing is imported by a name made at run time."""
    from agent import api
    from workers import ops
    assert all(isinstance(ns, types.ModuleType) for ns in api.NAMESPACES)
    assert all(callable(fn) and fn.__module__.startswith("workers.ops.")
               for fn in ops.OPS.values())
    users = {n for n, p in modules().items() if "importlib" in imports(p)}
    assert users == set()


def test_one_wire_constant_on_both_sides():
    from agent.client import protocol
    from agent.wire import jsonrpc
    assert jsonrpc.MAX_ID_LENGTH == protocol.MAX_ID_LENGTH


def test_no_module_over_about_400_lines_and_no_function_over_60():
    long_modules, long_functions = {}, {}
    for name, p in modules().items():
        text = p.read_text()
        if text.count("\n") > 440:
            long_modules[name] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long_functions[f"{name}:{node.name}"] = n
    assert long_modules == {} and long_functions == {}


def test_the_checks_are_not_vacuous(tmp_path):
    """Known imports are seen where they are (module level, inside a function, under
    TYPE_CHECKING); a planted forbidden import, a planted circle and the loop's own imports
    are all found."""
    known = modules()
    loop = imports(known["agent.supervisor.loop"])
    assert {"zmq", "agent.supervisor.tasks", "agent.supervisor.tasks.TaskTable"} <= loop
    assert "workers.ops" in imports(known["workers.runtime"])  # inside main()
    assert "agent.supervisor.loop" in imports(known["agent.wire.intake"])  # typing only
    assert "agent.supervisor.loop" not in imports(known["agent.wire.intake"], typing_too=False)
    planted = tmp_path / "bad.py"
    planted.write_text("def f():\n    from agent.supervisor import loop\n")
    assert offenders({**known, "agent.storage.bad": planted}, MAY_IMPORT) == {
        "agent.storage.bad": ["agent.supervisor.loop"]}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph(known)
    assert "agent.supervisor.tasks" in graph["agent.supervisor.loop"]
