"""A griffe extension for the API reference: the docstrings' Sphinx markup, read as Markdown.

saddlescope's docstrings are Google-style with a few reStructuredText pieces: roles such as
``:func:`~saddlescope.analyze```, ``:math:`\\lambda```, ``.. math::`` blocks and ``Example::``
literal blocks. mkdocstrings renders Markdown, where those would show as raw markup. Before
rendering, this extension turns

- a cross-reference role into an optional cross-reference (a link where the target is documented in
  the site, plain code where it is not: no broken links, so ``mkdocs build --strict`` passes);
  a bare name is looked up in the docstring's own class or module;
- ``:math:`x``` into inline code ``x`` (the site loads no MathJax: it must build and read offline);
- a Google section item that griffe cannot split into ``name: description`` into one it can: a name
  list wrapped over two lines (``a, b,`` / ``c: ...``) is joined, and a ``Raises:`` line that names no
  exception (``Everything f raises.``) is moved after the section as a sentence, instead of being
  dropped with a warning;
- an indented literal block, opened by ``.. math::`` or by a paragraph's closing ``::``, into a
  fenced code block (a closing ``Example::`` becomes a bold "Example", so that griffe does not read it
  as a Google "Examples" section).

It is loaded by path from mkdocs.yml (``extensions: [docs/griffe_sphinx_roles.py]``); the sources
are not changed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?P<role>func|class|meth|mod|data|attr|obj|exc|const|py:\w+):`(?P<target>[^`]+)`")
MATH = re.compile(r":math:`(?P<body>[^`]*)`")
LITERAL_OPENER = re.compile(r"^(?P<indent>[ \t]*)(?P<text>.*?)::[ \t]*$")


def _scopes(obj: griffe.Object) -> list[str]:
    """Where a bare name in ``obj``'s docstring is looked up: its class, its module, the package."""
    scopes = []
    if obj.is_module or obj.is_class:
        scopes.append(obj.path)
    elif obj.parent is not None and obj.parent.is_class:
        scopes.append(obj.parent.path)
    scopes += [obj.module.path, obj.package.path]
    return list(dict.fromkeys(scopes))


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def convert(text: str, scopes: list[str], resolve: Callable[[str], str | None] = lambda path: None) -> str:
    """The docstring ``text`` as Markdown. A bare name in a role is looked up in each of ``scopes`` in
    turn (the object's class, its module, the package); ``resolve(path)`` gives the canonical path of
    a documented object (through re-exports), or None."""

    def role(match: re.Match[str]) -> str:
        target = match["target"].strip()
        shown = target.lstrip("~")
        if "<" in shown and shown.endswith(">"):  # :func:`title <target>`
            title, shown = shown[:-1].split("<", 1)
            title = title.strip()
        else:
            title = shown.rsplit(".", 1)[-1] if target.startswith("~") else shown
        candidates = [shown] if shown.startswith("saddlescope") else [f"{scope}.{shown}" for scope in scopes]
        found = [path for path in map(resolve, candidates) if path is not None]
        identifier = found[0] if found else candidates[0]
        return (f'<autoref identifier="{html.escape(identifier)}" optional>'
                f"<code>{html.escape(title)}</code></autoref>")

    text = MATH.sub(lambda m: f"`{m['body']}`" if "`" not in m["body"] else m["body"], text)
    text = ROLE.sub(role, text)
    return fence_literal_blocks(repair_sections(text))


SECTION = re.compile(r"^(?P<indent>[ \t]*)(?P<title>Args|Arguments|Parameters|Attributes|Raises):[ \t]*$")
ITEM = re.compile(r"^[ \t]*[\w.*]+(?:[ \t]*,[ \t]*[\w.*]+)*[ \t]*(?:\([^)]*\))?[ \t]*:(?:[ \t]|$)")


def repair_sections(text: str) -> str:
    """Google section items griffe would drop, rewritten so that it reads them (see the module)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        header = SECTION.match(lines[i])
        out.append(lines[i])
        i += 1
        if header is None:
            continue
        base = len(header["indent"])
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            i -= 1
            body.pop()
        item_indent = min((_indent(line) for line in body if line.strip()), default=base + 4)
        kept, moved, j = [], [], 0
        while j < len(body):
            line = body[j]
            starts_item = line.strip() and _indent(line) == item_indent
            if starts_item and not ITEM.match(line) and line.rstrip().endswith(",") and j + 1 < len(body):
                body[j + 1] = line.rstrip() + " " + body[j + 1].strip()  # a wrapped name list
                j += 1
                continue
            if starts_item and not ITEM.match(line) and header["title"] == "Raises":
                moved.append(line.strip())
                j += 1
                while j < len(body) and body[j].strip() and _indent(body[j]) > item_indent:
                    moved.append(body[j].strip())
                    j += 1
                continue
            kept.append(line)
            j += 1
        out += kept
        if moved:
            out += ["", header["indent"] + " ".join(moved)]
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def fence_literal_blocks(text: str) -> str:
    """Each reStructuredText literal block (after ``.. math::`` or a line ending in ``::``) as a fenced
    Markdown code block at the opener's indentation."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        opener = LITERAL_OPENER.match(lines[i])
        if opener is None:
            out.append(lines[i])
            i += 1
            continue
        indent, words = opener["indent"], opener["text"].rstrip()
        if words in (".. math", ""):
            pass
        elif words in ("Example", "Examples", "For example"):
            out.append(f"{indent}**{words}**")
        else:
            out.append(f"{indent}{words}:")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block_start = j
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > len(indent)):
            j += 1
        while j > block_start and not lines[j - 1].strip():
            j -= 1
        block = lines[block_start:j]
        if block:
            cut = min(_indent(line) for line in block if line.strip())
            out += ["", f"{indent}```"] + [f"{indent}{line[cut:]}" if line.strip() else "" for line in block]
            out += [f"{indent}```", ""]
        i = j
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Once the package is loaded: every docstring rewritten, and re-exports left out of the pages.

    A module that re-exports a name (``saddlescope.critical`` lists ``PathPlan`` in ``__all__``) would
    document it a second time; the reference documents each object once, where it is defined, and the
    cross-references resolve through the re-exports to that place.
    """

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection

        def resolve(path: str) -> str | None:
            try:
                found = collection.get_member(path)
                return found.final_target.path if found.is_alias else found.path
            except Exception:  # not loaded, not found, or an alias to outside the package
                return None

        objects = list(_walk(pkg))
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, _scopes(obj), resolve)
        for obj in objects:
            if obj.is_module:
                for name, member in list(obj.members.items()):
                    if member.is_alias and member.target_path.startswith(pkg.path + "."):
                        obj.del_member(name)
