"""The package's layout rule (CONVENTIONS.md "Layout"): each sub-package imports only the leaves and the
sub-packages below it, and no two modules import each other, function-level imports included."""

from __future__ import annotations

import ast
import importlib.util
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


def imports(path: Path, name: str | None = None) -> set[str]:
    """Every clipcond module ``path`` (the module ``name``, by default its place in the package) imports, inside
    functions too; not those under ``if TYPE_CHECKING:``. ``from clipcond.store import format`` is the module
    ``clipcond.store.format``; relative imports resolve."""
    name = name or module(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in node.body for child in ast.walk(stmt)}
    here = name.split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    known = {module(p) for p in ROOT.rglob("*.py")}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            if base.split(".")[0] == "clipcond":
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "clipcond"}
    resolved = set()
    for target in found:
        while target not in known and "." in target:
            target = target.rpartition(".")[0]
        resolved.add(target)
    return resolved - {name}


def graph() -> dict[str, set[str]]:
    return {module(p): imports(p) for p in ROOT.rglob("*.py")}


def test_no_module_imports_a_higher_layer():
    """Catches an import that climbs (a store module reaching into precompute, as gc once did for the scan
    folders' cleanup), which would let a lower layer depend on a higher one."""
    upward = sorted(f"{a} imports {b}" for a, targets in graph().items() if a not in TOP
                    for b in targets if b not in TOP and layer(b) > layer(a))
    assert not upward, upward


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): every import cycle, of any length."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(a: str) -> None:
        index[a] = low[a] = len(index)
        stack.append(a)
        for b in g.get(a, ()):
            if b not in index:
                visit(b)
                low[a] = min(low[a], low[b])
            elif b in stack:
                low[a] = min(low[a], index[b])
        if low[a] == index[a]:
            component = []
            while not component or component[-1] != a:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for a in sorted(g):
        if a not in index:
            visit(a)
    return found


def test_no_import_cycles():
    """Catches modules importing each other, directly (specs <-> openclip, store <-> dataset once) or around a
    longer loop, lazy imports inside functions included."""
    g = {a: targets - TOP for a, targets in graph().items() if a not in TOP}
    assert not cycles(g), cycles(g)


def test_cycles_are_found_around_loops_of_any_length():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_submodule_and_relative_imports_resolve(tmp_path):
    """Catches ``from clipcond.precompute import tar`` read as the package, not the module it imports, and relative
    imports (``from . import scan``, ``from ..store.format import X``) not seen at all."""
    source = tmp_path / "m.py"
    source.write_text("from clipcond.precompute import tar\nfrom . import scan\n"
                      "from ..store.format import StoreFiles\ndef f():\n    from .plan import Plan\n")
    assert imports(source, "clipcond.precompute.m") == {"clipcond.precompute.tar", "clipcond.precompute.scan",
                                                       "clipcond.store.format", "clipcond.precompute.plan"}


def test_the_sub_packages_are_there():
    """The folders a newcomer reads the architecture from."""
    assert {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} == set(LAYERS)


# Private names of torch and diffusers that clipcond relies on, each for a reason given where it is used.
THIRD_PARTY_PRIVATE = {"_parameters", "_buffers", "_modules", "_compiled_call_impl", "_apply", "_attn_implementation",
                       "_new_shared", "_clean_caption"}


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module that is no package
        return False


def test_no_module_reaches_into_another_modules_private_names():
    """Catches the prompt readers (text/) calling the conditioner's private methods (tc._put, tc._assemble), or a
    store module calling another's (store._fetch), or importing one (``from clipcond.x import _helper``): what one
    module needs from another is public, and named so. Private modules (``_files``, ``_rows``) are modules."""
    reached = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipcond"):
                reached += [f"{module(path)}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")
                            and not is_module(f"{node.module}.{a.name}")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in THIRD_PARTY_PRIVATE
                    and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls", *own})):
                reached.append(f"{module(path)}:{node.lineno} {ast.unparse(node)}")
    assert not reached, reached
