"""The package layout is the architecture: no import circles between kcd_fast's modules
(imports inside functions count), the core never imports the loader or the trainer, and
the repository points nowhere outside itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kcd_fast"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """kcd_fast modules that ``name`` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # `from pkg import name`: a submodule, else the package
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("kcd_fast"):
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            # a package's __init__ re-exporting its own submodules is not a circle
            if m == d.rpartition(".")[0] or d == "kcd_fast":
                continue
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_circles() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "kcd_fast.loader.core" in graph
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    graph = import_graph()
    graph["kcd_fast.bank"] = {*graph["kcd_fast.bank"], "kcd_fast.loader.core"}  # core -> bank -> core
    assert _find_cycle(graph) is not None


@pytest.mark.parametrize("core", ["ops", "condense", "schedule", "bank", "memory", "distributed", "checkpoint"])
def test_the_core_depends_on_neither_the_loader_nor_the_trainer(core: str) -> None:
    graph = import_graph()
    seen, todo = set(), [f"kcd_fast.{core}"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(d for d in graph.get(m, ()) if d != "kcd_fast")
    bad = sorted(m for m in seen if m.startswith(("kcd_fast.loader", "kcd_fast.kd", "kcd_fast.data")))
    assert not bad, f"kcd_fast.{core} reaches {bad}"


def test_nothing_in_the_repository_points_outside_it() -> None:
    files = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".cpp", ".cu", ".h", ".cuh", ".sh", ".toml"}]
    files = [p for p in files if not any(part in {".venv", "build", ".git"} for part in p.parts)]
    outside = ("../" + "shared", "KCD" + "_SPEC")  # the steering repo's files: not in a clone
    hits = [str(p.relative_to(ROOT)) for p in files if any(o in p.read_text(errors="ignore") for o in outside)]
    assert not hits, hits


# -- no module of ours shadows an installed package ---------------------------------------------
def _shadowed(path_entries: list[str]) -> dict[str, str]:
    """Installed top-level packages that ``path_entries`` (searched in order, like sys.path)
    would resolve to a file of this repository (outside the virtual environment)."""
    import importlib.machinery
    import importlib.metadata
    import sys

    prefix = Path(sys.prefix).resolve()
    out: dict[str, str] = {}
    for name in importlib.metadata.packages_distributions():
        if name == "kcd_fast" or not name.isidentifier():
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, path_entries)
        where = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if where is not None and where.is_relative_to(ROOT) and not where.is_relative_to(prefix):
            out[name] = str(where)
    return out


def test_no_installed_package_resolves_into_the_repository_while_the_tests_run() -> None:
    """benchmarks/kernels.py once shadowed PyPI's `kernels` (transformers imports it): every
    benchmark script is loaded as the tests load them, and then no installed package resolves
    into the repository through sys.path, and benchmarks/ is not on it."""
    import sys

    from bench_modules import BENCH, load_benchmark

    for script in sorted(BENCH.glob("*.py")):
        load_benchmark(script.stem)
    assert str(BENCH) not in sys.path
    assert _shadowed(list(sys.path)) == {}


def test_the_shadow_check_finds_a_planted_module() -> None:
    import sys

    planted = ROOT / "tests" / "_planted_shadow_check"
    planted.mkdir()
    try:
        (planted / "numpy.py").write_text("")
        assert _shadowed([str(planted), *sys.path]) == {"numpy": str(planted / "numpy.py")}
    finally:
        (planted / "numpy.py").unlink()
        planted.rmdir()


# -- the documentation's links ------------------------------------------------------------------
def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves() -> None:
    """README.md and docs/*.md: every relative link names a file of the repository, and every
    #anchor a heading of that file (the front page sends newcomers to docs/ in one click)."""
    import re

    broken: list[str] = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, mailto:
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)
