"""The package's layout rule (CONVENTIONS.md "Layout"): each sub-package imports only the leaves and the
sub-packages below it, and no two modules import each other, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import clipcond

ROOT = Path(clipcond.__file__).parent
LAYERS = {"text": 1, "encoders": 2, "store": 3, "precompute": 4}  # leaves (specs, conditioning, ...) are 0
TOP = {"clipcond", "clipcond.cli", "clipcond.__main__"}  # the public face and the command line use everything


def module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports(path: Path) -> set[str]:
    """Every clipcond module ``path`` imports, inside functions too; not those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in node.body for child in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipcond"):
            found |= {f"{node.module}.{a.name}" if node.module == "clipcond" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("clipcond")}
    known = {module(p) for p in ROOT.rglob("*.py")}
    resolved = set()
    for name in found:
        while name not in known and "." in name:
            name = name.rpartition(".")[0]
        resolved.add(name)
    return resolved - {module(path)}


def graph() -> dict[str, set[str]]:
    return {module(p): imports(p) for p in ROOT.rglob("*.py")}


def test_no_module_imports_a_higher_layer():
    """Catches an import that climbs (a store module reaching into precompute, as gc once did for the scan
    folders' cleanup), which would let a lower layer depend on a higher one."""
    upward = sorted(f"{a} imports {b}" for a, targets in graph().items() if a not in TOP
                    for b in targets if b not in TOP and layer(b) > layer(a))
    assert not upward, upward


def test_no_two_modules_import_each_other():
    """Catches mutual imports (specs <-> openclip, store <-> dataset once), lazy ones inside functions included."""
    g = graph()
    pairs = sorted({tuple(sorted((a, b))) for a, targets in g.items() for b in targets if a in g.get(b, ())})
    assert not pairs, pairs


def test_the_sub_packages_are_there():
    """The folders a newcomer reads the architecture from."""
    assert {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS)
