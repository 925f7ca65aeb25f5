"""The package layers hold (README "Layout"): the import-linter contracts of pyproject.toml pass,
the state layer takes nothing from models but its leaf helpers, and no module of the project
is part of an import cycle. grimp reads every import statement, function-local ones included,
so a cycle hidden inside a function is found too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]

def root_packages() -> list[str]:
    """pyproject's import-linter root packages."""
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"][
        "root_packages"]


def import_cycles(graph) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    adj = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)

    for root in adj:
        if root in index:
            continue
        visit(root)
        work = [(root, iter(adj[root]))]
        while work:
            node, edges = work[-1]
            for w in edges:
                if w not in index:
                    visit(w)
                    work.append((w, iter(adj[w])))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def test_import_linter_contracts_hold():
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(root_packages()), "every top-level package must be in the contracts' root_packages"
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe) if exe.exists() else shutil.which("lint-imports") or "lint-imports", "--no-cache"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "BROKEN" not in done.stdout


def test_state_takes_only_the_leaf_helpers_of_models():
    graph = grimp.build_graph("state", "models", cache_dir=None)
    allowed = {"models", "models.errors", "models.files"}
    taken = {(m, t) for m in graph.modules if m.split(".")[0] == "state"
             for t in graph.find_modules_directly_imported_by(m) if t.split(".")[0] == "models" and t not in allowed}
    assert not taken, sorted(taken)


def test_no_import_cycles():
    graph = grimp.build_graph(*root_packages(), cache_dir=None)
    cycles = import_cycles(graph)
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_the_cycle_finder_sees_a_function_local_cycle(tmp_path, monkeypatch):
    """A two-module package whose cycle hides inside a function is reported; one without is not."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclepkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from cyclepkg import a\n    return a\n")
    (pkg / "c.py").write_text("from cyclepkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles(grimp.build_graph("cyclepkg", cache_dir=None)) == [frozenset({"cyclepkg.a", "cyclepkg.b"})]
    (pkg / "b.py").write_text("def f():\n    return 1\n")
    assert import_cycles(grimp.build_graph("cyclepkg", cache_dir=None)) == []
