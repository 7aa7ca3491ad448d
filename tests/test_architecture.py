"""The package layout is the architecture (docs/design.md): folders on floors, imports only downward.

Reads every module's imports with ``ast`` (those inside functions too) and checks that
- each module imports only from its own folder or from folders on lower floors;
- nothing imports the package ``__init__`` (the version lives in ``_version``);
- no two modules import each other, directly or through others (no import circle);
- every folder says in its docstring what it owns and what it may import.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "exmyconv"
# lowest first; a unit is a folder or a module at the package root
FLOORS = {"_version": 0, "errors": 0, "format": 1, "io": 2, "cuda": 3, "torch": 4, "check": 5, "convert": 6,
          "integrations": 7, "bench": 8, "cli": 9, "__init__": 10, "__main__": 10}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Modules of the package that `name` imports (dotted, relative to the package)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "exmyconv":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from .x import y`: y may be a module of x
                sub = ".".join([*target, alias.name])
                found.add(sub if sub in MODULES else ".".join(target) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "exmyconv":
                    found.add(".".join(alias.name.split(".")[1:]) or "__init__")
    return found


MODULES = modules()
GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def unit(name: str) -> str:
    return name.split(".")[0]


def test_every_unit_has_a_floor():
    assert {unit(m) for m in MODULES} <= set(FLOORS), sorted({unit(m) for m in MODULES} - set(FLOORS))


def test_imports_only_go_down():
    wrong = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
             if unit(a) != unit(b) and FLOORS[unit(b)] >= FLOORS[unit(a)]]
    assert not wrong, wrong


def test_nothing_imports_the_package_init():
    wrong = [a for a, targets in GRAPH.items() if "__init__" in targets and a not in ("__main__",)]
    assert not wrong, wrong


def test_no_import_circle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if n not in GRAPH:
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_checker_sees_imports():
    """Guard against a checker that reads nothing: known edges must be found."""
    assert "format.exmy" in GRAPH["format.quant"]
    assert "io.checkpoint" in GRAPH["torch.state_dict"]
    assert "convert.pipeline" in GRAPH["__init__"]  # an import inside a function
    assert "cuda.gpu" in GRAPH["cuda"]


def test_every_folder_says_what_it_owns_and_imports():
    for folder in sorted(p.parent for p in PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert len(doc) > 80 and "mport" in doc, f"{folder.name}/__init__.py needs a docstring: what it owns and imports"


def test_reading_a_local_folder_never_touches_hub_code(tmp_path):
    """inspect / load_state_dict / Checkpoint of a local folder import neither our Hub code nor huggingface_hub."""
    import numpy as np

    from exmyconv.format.quant import quantize
    from exmyconv.io.writer import ShardWriter

    q = quantize(np.ones((4, 64), np.float32), __import__("exmyconv").get_format("e2m2"))
    path = tmp_path / "model.safetensors"
    w = ShardWriter(path, [("w", "U8", q.payload.shape)], {})
    w.write("w", q.payload)
    w.close()
    code = ("import sys, exmyconv; exmyconv.inspect(sys.argv[1]); exmyconv.load_state_dict(sys.argv[1]);"
            "bad = [m for m in sys.modules if m.startswith(('exmyconv.io.hub', 'exmyconv.integrations.hub',"
            " 'huggingface_hub'))]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(PKG.parent)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
