"""A1111 prompt editing and alternation: which text is in force at which sampler step, and ``AND``.

The syntax and its step arithmetic are AUTOMATIC1111's (``modules/prompt_parser.py``,
``get_learned_conditioning_prompt_schedules``; its doctests are in tests/test_prompt_styles.py):

- ``[from:to:when]`` shows ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds
  ``to`` after ``when``, ``[from::when]`` removes ``from`` after it;
- ``when`` with a dot is a fraction of the steps (``0.4``, even ``1.0``), without one a step number;
  ``[cat|dog]`` alternates every step;
- a schedule is ``[(end_step, text), ...]`` with ``end_step`` inclusive, sampler steps counted from 1;
  a sampler at 0-based step ``i`` uses the first segment whose ``end_step >= i`` (A1111's
  ``current_step <= end_at_step``);
- ``a cat AND a dog :1.2`` is two prompts, the second weighted 1.2 in classifier-free guidance.

The parser is a small recursive descent over the grammar A1111 gives lark; a prompt it cannot
read is kept as it is, as A1111 keeps it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?=])")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)


@dataclass(frozen=True, slots=True)
class Emphasis:
    parts: tuple  # literal brackets and colons as str, prompts as tuples of nodes


@dataclass(frozen=True, slots=True)
class Scheduled:
    before: tuple | None
    after: tuple
    when: str  # the number as written: a dot makes it a fraction of the steps


@dataclass(frozen=True, slots=True)
class Alternate:
    options: tuple  # prompts; an empty option is ()


class _Fail(Exception):
    pass


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    def prompt(self, i: int, stops: str) -> tuple[tuple, int]:
        """Nodes from ``i`` up to a character in ``stops`` (or the end); raises _Fail on anything else."""
        nodes: list = []
        text = self.text
        while i < len(text) and text[i] not in stops:
            char = text[i]
            if char == "(":
                node, i = self.emphasized(i)
            elif char == "[":
                node, i = self.bracketed(i)
            elif (m := _PLAIN.match(text, i)) is not None:
                node, i = m.group(0), m.end()
            else:
                raise _Fail
            nodes.append(node)
        return tuple(nodes), i

    def expect(self, i: int, char: str) -> int:
        if i >= len(self.text) or self.text[i] != char:
            raise _Fail
        return i + 1

    def emphasized(self, i: int) -> tuple[Emphasis, int]:
        inner, j = self.prompt(i + 1, "):")
        if j < len(self.text) and self.text[j] == ":":
            weight, k = self.prompt(j + 1, ")")
            return Emphasis(("(", inner, ":", weight, ")")), self.expect(k, ")")
        return Emphasis(("(", inner, ")")), self.expect(j, ")")

    def bracketed(self, i: int) -> tuple[Emphasis | Scheduled | Alternate, int]:
        for parse in (self.scheduled, self.alternate):
            try:
                return parse(i)
            except _Fail:
                pass
        inner, j = self.prompt(i + 1, "]")
        return Emphasis(("[", inner, "]")), self.expect(j, "]")

    def scheduled(self, i: int) -> tuple[Scheduled, int]:
        first, j = self.prompt(i + 1, ":]|")
        j = self.expect(j, ":")
        number = _NUMBER.match(self.text, j)
        if number is not None:  # [to:when]
            return Scheduled(None, first, number.group(1)), number.end() + 1
        second, k = self.prompt(j, ":]|")
        k = self.expect(k, ":")
        number = _NUMBER.match(self.text, k)
        if number is None:
            raise _Fail
        return Scheduled(first, second, number.group(1)), number.end() + 1

    def alternate(self, i: int) -> tuple[Alternate, int]:
        options, j = [], i
        while True:
            option, j = self.prompt(j + 1, "|]")
            options.append(option)
            if self.text[j : j + 1] == "]":
                break
            self.expect(j, "|")
        if len(options) < 2:
            raise _Fail
        return Alternate(tuple(options)), j + 1

    def start(self) -> tuple:
        """The whole prompt; stray brackets and colons that form nothing stay text (A1111's start rule,
        ``(prompt | /[][():]/+)*``); a stray ``|`` or a lone trailing backslash fails the parse (_Fail), and A1111
        then keeps the prompt as written."""
        nodes, i = [], 0
        while i < len(self.text):
            try:
                part, i = self.prompt(i, "")
                nodes.extend(part)
            except _Fail:
                pass
            if i < len(self.text):
                char = self.text[i]
                try:
                    node, i = (self.emphasized(i) if char == "(" else self.bracketed(i) if char == "[" else (None, i))
                    if node is None:
                        raise _Fail
                    nodes.append(node)
                except _Fail:
                    if char == "|" or (char == "\\" and i == len(self.text) - 1):  # no rule of A1111's takes it
                        raise
                    nodes.append(char)
                    i += 1
        return tuple(nodes)


def _when(value: str, steps: int, *, hires: bool, base_steps: int) -> int:
    # A1111: a number with a dot is a fraction of the pass (the hires pass is offset by 1.0), an
    # integer an absolute step (the hires pass is offset by the base steps); truncated, at most steps.
    if "." in value:
        v = (float(value) - (1.0 if hires else 0.0)) * steps
    else:
        v = float(value) - (base_steps if hires else 0)
    return min(steps, int(v))


def _steps(nodes: tuple, steps: int, found: set[int], **offsets: object) -> None:
    for node in nodes:
        if isinstance(node, Emphasis):
            _steps(tuple(n for part in node.parts if isinstance(part, tuple) for n in part), steps, found, **offsets)
        elif isinstance(node, Scheduled):
            when = _when(node.when, steps, **offsets)
            if when >= 1:
                found.add(when)
            _steps(node.before or (), steps, found, **offsets)
            _steps(node.after, steps, found, **offsets)
        elif isinstance(node, Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _steps(option, steps, found, **offsets)


def _text(nodes: tuple, step: int, steps: int, **offsets: object) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Emphasis):
            out.extend(part if isinstance(part, str) else _text(part, step, steps, **offsets) for part in node.parts)
        elif isinstance(node, Scheduled):
            chosen = node.before or () if step <= _when(node.when, steps, **offsets) else node.after
            out.append(_text(chosen, step, steps, **offsets))
        else:
            out.append(_text(node.options[(step - 1) % len(node.options)], step, steps, **offsets))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, *, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]``, as A1111's ``get_learned_conditioning_prompt_schedules([prompt], steps)[0]``.

    ``hires_steps``: the schedule of the hires pass (``steps`` is then the first pass's step count).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    try:
        nodes = _Parser(prompt).start()
    except _Fail:
        return [(hires_steps or steps, prompt)]
    total = hires_steps or steps
    offsets = {"hires": hires_steps is not None, "base_steps": steps}
    found = {total}
    _steps(nodes, total, found, **offsets)
    return [(step, _text(nodes, step, total, **offsets)) for step in sorted(found)]


def split_and(prompt: str) -> list[tuple[float, str]]:
    """``"a cat AND a dog :1.2"`` -> ``[(1.0, "a cat"), (1.2, " a dog")]`` (A1111's composable diffusion)."""
    out = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)  # always matches: the text, without a trailing ":weight" and whitespace
        out.append((float(match.group(2)) if match.group(2) else 1.0, match.group(1)))
    return out
