"""Package structure: no import cycle anywhere in vlmrel_core, and no streamlit in the library.

The graph counts every import, including those inside functions: a lazy import hides a cycle from the interpreter
but not from a reader, and it is how the probes <-> report cycle used to look.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlmrel_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> vlmrel_core modules it imports (``from pkg import module`` counts as importing the module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_known_edges_and_finds_a_planted_cycle():
    graph = _import_graph()
    assert "vlmrel_core.analysis.probes" in graph["vlmrel_core.analysis.sweep"]
    assert "vlmrel_core.analysis.report" in graph["vlmrel_core.analysis.report_io"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_vlmrel_core():
    assert _cycles(_import_graph()) == []


def test_the_library_never_imports_streamlit():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] == "streamlit"]
    assert offenders == []


def test_analysis_and_interventions_import_without_streamlit():
    """Importing every analysis and interventions module (in a fresh interpreter) pulls in no streamlit."""
    names = sorted(_module_name(p) for package in ("analysis", "interventions") for p in (PACKAGE / package).glob("*.py"))
    code = f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n" \
           "assert 'streamlit' not in sys.modules, sorted(m for m in sys.modules if m.startswith('streamlit'))[:5]\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_ablate_and_extract_paths_import_no_scikit_learn():
    """scikit-learn (with scipy.stats) takes ~1.5 s to import and only fitting needs it: `vlmrel ablate` loads a
    saved probe and the extraction computes signals, so the modules on their path import it where a fit happens."""
    names = ["vlmrel_core.cli.interventions", "vlmrel_core.interventions.study", "vlmrel_core.interventions.ablation",
             "vlmrel_core.engine.loading", "vlmrel_core.engine.extract",
             "vlmrel_core.analysis.probes", "vlmrel_core.analysis.metrics", "vlmrel_core.signals.attention"]
    code = f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n" \
           "print(sorted(m for m in ('sklearn', 'scipy.stats') if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_engine_loading_imports_no_transformers():
    """`load_vlm` answers a bad model path before importing transformers (seconds): its module must not pull it in."""
    code = "import sys\nimport vlmrel_core.engine.loading, vlmrel_core.engine.run\nprint('transformers' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
