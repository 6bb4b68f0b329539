"""The package's layering, read from the source with `ast` (every import, those inside functions included):

    0  errors                 nothing of scgcm
    1  nn/, data/             errors; never each other
    2  core/                  nn (never data: the math sees arrays, not data sets)
    3  parallel/              core, nn, data
    4  eval/                  everything below
    5  run/                   everything below
    6  the CLIs at the root   everything below; never each other, and nothing imports them

Within one subpackage modules may import each other, but no import cycle is allowed anywhere; only the CLIs
import tyro. A failure names the file and line of every offending import.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scgcm"
LAYERS = {"errors": 0, "nn": 1, "data": 1, "core": 2, "parallel": 3, "eval": 4, "run": 5}
CLI_LAYER = 6
FORBIDDEN = {("core", "data"): "core/ sees arrays, not data sets"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    """'nn', 'data', … for a subpackage's modules, 'errors', or the CLI's own name for a root module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    g = group(module)
    return LAYERS.get(g, CLI_LAYER if g != "__init__" else 0)


def resolve(root: Path, name: str) -> str | None:
    """The scgcm module an import of `name` loads: a module file, else a package's __init__."""
    parts = name.split(".")
    if parts[0] != root.name:
        return None
    base = root.parent.joinpath(*parts)
    if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
        return name
    return None


def imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported scgcm module, line) of every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from scgcm.data import sources` imports the module scgcm.data.sources
                found.append((f"{node.module}.{a.name}" if resolve(root, f"{node.module}.{a.name}") else node.module,
                              node.lineno))
    return [(resolve(root, name), line) for name, line in found if resolve(root, name)]


def import_graph(root: Path) -> dict[str, list[tuple[str, Path, int]]]:
    graph = {}
    for path in sorted(root.rglob("*.py")):
        graph[module_name(path, root)] = [(target, path, line) for target, line in imports(path, root)]
    return graph


def cycles(graph: dict[str, list[tuple[str, Path, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), by Tarjan."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or any(t == v for t, _, _ in graph.get(v, [])):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layering_problems(root: Path) -> list[str]:
    """Every import against the layer order or the rules above, and every cycle, one line each."""
    graph, problems = import_graph(root), []
    for source, edges in graph.items():
        for target, path, line in edges:
            where = f"{path.relative_to(root.parent)}:{line}: {source} imports {target}"
            gs, gt = group(source), group(target)
            if gs == gt and layer(source) < CLI_LAYER:
                continue  # within one subpackage; cycles are checked below
            if layer(target) >= layer(source):
                kind = "another CLI" if layer(source) == layer(target) == CLI_LAYER else f"layer {layer(target)} ({gt})"
                problems.append(f"{where}: {kind} from layer {layer(source)} ({gs})")
            elif (gs, gt) in FORBIDDEN:
                problems.append(f"{where}: {FORBIDDEN[gs, gt]}")
    for component in cycles(graph):
        lines = [f"{p.relative_to(root.parent)}:{ln} ({s} → {t})" for s in component for t, p, ln in graph[s]
                 if t in component]
        problems.append(f"import cycle {' ↔ '.join(component)}: " + "; ".join(lines))
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if layer(module) == CLI_LAYER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n.split(".")[0] == "tyro" for n in names):
                where = f"{path.relative_to(root.parent)}:{node.lineno}"
                problems.append(f"{where}: {module} imports tyro: only the CLIs parse flags")
    return problems


def test_no_cycle_and_every_import_follows_the_layers():
    problems = layering_problems(PACKAGE)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_subpackage_init_files_are_empty():
    """Import by full path: an __init__ that re-exports would hide which layer a name comes from."""
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent != PACKAGE:
            assert not init.read_text().strip(), f"{init} is not empty"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "scgcm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for sub in {Path(n).parent for n in files} - {Path(".")}:
        (root / "scgcm" / sub / "__init__.py").touch()
    (root / "scgcm" / "__init__.py").touch()
    return root / "scgcm"


@pytest.mark.parametrize("files, expected", [
    ({"nn/a.py": "def f():\n    from scgcm.run import config\n", "run/config.py": ""},
     "scgcm/nn/a.py:2: scgcm.nn.a imports scgcm.run.config: layer 5 (run) from layer 1 (nn)"),
    ({"core/a.py": "import scgcm.core.b\n", "core/b.py": "def f():\n    from scgcm.core import a\n"},
     "import cycle scgcm.core.a ↔ scgcm.core.b"),
    ({"sample.py": "from scgcm.train import main\n", "train.py": ""},
     "scgcm/sample.py:1: scgcm.sample imports scgcm.train: another CLI from layer 6 (sample)"),
    ({"nn/a.py": "from scgcm.data.images import x\n", "data/images.py": ""},
     "scgcm/nn/a.py:1: scgcm.nn.a imports scgcm.data.images: layer 1 (data) from layer 1 (nn)"),
    ({"core/a.py": "from scgcm.data import images\n", "data/images.py": ""},
     "scgcm/core/a.py:1: scgcm.core.a imports scgcm.data.images: core/ sees arrays, not data sets"),
    ({"run/a.py": "import tyro\n"}, "scgcm/run/a.py:1: scgcm.run.a imports tyro"),
])
def test_the_check_names_file_and_line(tmp_path, files, expected):
    problems = layering_problems(_write(tmp_path, files))
    assert any(p.startswith(expected) for p in problems), problems


def test_a_clean_tree_passes(tmp_path):
    root = _write(tmp_path, {"errors.py": "", "nn/a.py": "from scgcm.errors import UserError\n",
                             "core/b.py": "from scgcm.nn import a\n", "train.py": "import tyro\nfrom scgcm.core import b\n"})
    assert layering_problems(root) == []
