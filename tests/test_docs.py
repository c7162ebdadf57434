"""The documentation against the package: names in code blocks, README's test command, links.

Each test names the bug it catches:

- README's "Your own encoder" showed ``clipcond.register_encoder(spec, aliases=...)`` while
  ``clipcond/__init__.py`` did not export it, so the documented example raised AttributeError.
  Every ``clipcond.NAME`` and ``from clipcond import NAME`` in a Python code block of README.md and
  docs/*.md must be an attribute of the package and listed by ``dir(clipcond)``.
- .ci/run runs README's test command verbatim; an edit to one but not the other means CI tests
  something else than what the README tells users to run.
- Moving details from README.md into docs/ leaves links behind: every relative link must point to
  an existing file (and a ``#fragment`` to an existing heading of a Markdown file), and README.md
  stays within 12 KB.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import clipcond

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
README_MAX_BYTES = 12 * 1024  # the README is the pitch and the map; details live in docs/
PYTHON_LANGS = {"python", "py", ""}  # an unlabelled fence is read as Python too

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
# `from clipcond import A, B as C` or `from clipcond.store import (A,\n B)`
FROM_IMPORT = re.compile(r"^\s*from\s+(clipcond(?:\.\w+)*)\s+import\s+(\([^)]*\)|[^\n#]+)", re.M)
PLAIN_IMPORT = re.compile(r"^\s*import\s+([^\n#]+)", re.M)
# clipcond.NAME, not `.clipcond.lock` (a file in a store) nor `x.clipcond.y`
ATTRIBUTE = re.compile(r"(?<![\w.])clipcond\.([A-Za-z_]\w*)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+\1", re.S)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block, in order."""
    blocks: list[tuple[str, str]] = []
    fence, lang, body = None, "", []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, lang, body = match.group(1), match.group(2).lower(), []
        elif match and match.group(1).startswith(fence) and not match.group(2):
            blocks.append((lang, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    return blocks


def outside_fences(text: str) -> str:
    """The text outside fenced blocks: where headings are (a `# comment` in a bash block is none)."""
    lines, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            if match and match.group(1).startswith(fence) and not match.group(2):
                fence = None
        else:
            lines.append(line)
    return "\n".join(lines)


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans: where links are."""
    return INLINE_CODE.sub("", outside_fences(text))


def clipcond_uses(code: str) -> list[tuple[str, str]]:
    """``(module, name)`` pairs that ``code`` takes from clipcond: ``name`` must be an attribute of
    ``module``; ``name == ""`` means the module itself must import."""
    uses = []
    for module, names in FROM_IMPORT.findall(code):
        for item in names.strip("()").replace("\n", " ").split(","):
            name = item.split(" as ")[0].strip()
            if name:
                uses.append((module, name))
    for names in PLAIN_IMPORT.findall(code):
        for item in names.split(","):
            module = item.split(" as ")[0].strip()
            if module.startswith("clipcond."):
                uses.append((module, ""))
    # import lines name modules, not attributes: `from clipcond.store import X` is not clipcond.store
    code = FROM_IMPORT.sub("", PLAIN_IMPORT.sub("", code))
    uses += [("clipcond", name) for name in ATTRIBUTE.findall(code)]
    return uses


def missing(module_name: str, name: str) -> str | None:
    """Why ``module_name.name`` is not usable as documented, or None."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return f"module {module_name} does not import ({err})"
    if not name:
        return None
    if not hasattr(module, name):
        return f"{module_name}.{name} raises AttributeError"
    if module is clipcond and name not in dir(clipcond):
        return f"clipcond.{name} exists but is missing from dir(clipcond) (add it to __all__)"
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    text = outside_fences(path.read_text(encoding="utf-8")) if path.suffix == ".md" else ""
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(heading)
        name, n = base, 0
        while name in found:  # GitHub numbers repeated headings
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_extractors_see_what_a_reader_sees() -> None:
    """Guards the guard: names in every import form and attribute chain are found, store file names are not."""
    code = (
        "import torch, clipcond\n"
        "from clipcond import TextConditioner, EmbeddingStore as ES\n"
        "from clipcond import (\n    get_spec,\n    register_encoder,\n)\n"
        "from clipcond.store.manifest import Manifest\n"
        "tc = clipcond.TextConditioner.from_pretrained('sd15')  # see OUT/.clipcond.lock\n"
        "spec = clipcond.nope_not_here\n"
    )
    assert sorted(clipcond_uses(code)) == sorted([
        ("clipcond", "TextConditioner"), ("clipcond", "EmbeddingStore"), ("clipcond", "get_spec"),
        ("clipcond", "register_encoder"), ("clipcond.store.manifest", "Manifest"),
        ("clipcond", "TextConditioner"), ("clipcond", "nope_not_here"),
    ])
    assert missing("clipcond", "nope_not_here") == "clipcond.nope_not_here raises AttributeError"
    assert missing("clipcond", "register_encoder") is None
    text = "a\n```python\nx = 1\n```\n```\ny\n```\n```bash\nz\n```\n"
    assert code_blocks(text) == [("python", "x = 1"), ("", "y"), ("bash", "z")]


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_clipcond_name_in_a_code_block_exists(doc: Path) -> None:
    """README "Your own encoder" showed ``clipcond.register_encoder``, which raised AttributeError."""
    problems = []
    for lang, code in code_blocks(doc.read_text(encoding="utf-8")):
        if lang not in PYTHON_LANGS:
            continue
        for module_name, name in clipcond_uses(code):
            why = missing(module_name, name)
            if why:
                problems.append(f"{_id(doc)}: {module_name}{'.' + name if name else ''}: {why}")
    assert not problems, "documented names that do not work:\n" + "\n".join(sorted(set(problems)))


def test_the_docs_show_clipcond_code() -> None:
    """An extractor that found nothing would pass the test above vacuously."""
    seen = {name for doc in DOCS for lang, code in code_blocks(doc.read_text(encoding="utf-8"))
            if lang in PYTHON_LANGS for _, name in clipcond_uses(code)}
    assert {"TextConditioner", "EmbeddingStore", "register_encoder", "get_spec"} <= seen


def test_readme_test_command_is_what_ci_runs() -> None:
    """.ci/run runs README's test command verbatim: the two must not drift apart."""
    commands = [code.strip() for lang, code in code_blocks(README.read_text(encoding="utf-8"))
                if lang in ("bash", "sh", "shell") and "python -m pytest" in code]
    assert len(commands) == 1, f"README.md: expected one bash block running python -m pytest, found {len(commands)}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[0] in ci.splitlines(), f"README.md's test command is not a line of .ci/run:\n{commands[0]}"


def test_readme_size() -> None:
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, at most {README_MAX_BYTES}: move details to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_relative_links_resolve(doc: Path) -> None:
    """Moving README sections into docs/ must not leave links to files or headings that are not there."""
    problems = []
    for target in LINK.findall(prose(doc.read_text(encoding="utf-8"))):
        if SCHEME.match(target):
            continue  # https:, mailto:
        path_part, _, fragment = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            problems.append(f"{_id(doc)}: ({target}): {path_part} does not exist")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            problems.append(f"{_id(doc)}: ({target}): no heading #{fragment} in {path.relative_to(ROOT)}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_dir_lists_the_public_names_not_the_modules_own_imports():
    """Catches ``dir(clipcond)`` offering ``importlib``, ``TYPE_CHECKING`` or ``annotations`` beside the API."""
    names = set(dir(clipcond))
    assert set(clipcond.__all__) <= names and not {"importlib", "TYPE_CHECKING", "annotations", "ModuleType"} & names
