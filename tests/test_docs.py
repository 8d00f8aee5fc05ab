"""Every code block in README.md and docs/ runs here, so an example that stops working fails CI.

How a page runs (one test per page, blocks in page order, a fresh namespace and a fresh temporary
working directory per page, so a block may use what an earlier block of the same page defined):

- ```` ```python ````: executed. If it prints, and the next fenced block (nothing but blank lines
  between) is ```` ```text ````, that block is its expected output (see "Output" below).
- ```` ```python ```` preceded by ``<!-- file: NAME -->``: written to ``NAME`` in the working directory
  instead of executed (and compiled, to catch a syntax error): the module a later command imports,
  e.g. ``saddlescope analyze --model mymodels.py:make_net``.
- ```` ```bash ```` / ```` ```sh ````: each command runs (a trailing backslash continues it on the next
  line). A following ```` ```text ```` block is the block's expected output. ```` ```console ````: lines
  starting with ``$ `` are commands, the lines after one are its expected output.
  Commands are ``saddlescope ...`` (run as ``python -m saddlescope.cli ...``) and ``python script.py``
  / ``python -m module``. They run in this process (``runpy``: what ``python -m`` does, without a
  second interpreter start and torch import per command), with ``sys.argv``, the working directory,
  stdout and stderr set as a shell would; a non-zero exit fails the page.
- ``<!-- skip: REASON -->`` right before a block: not run; :func:`test_skipped_block` reports each one
  (page, line, reason) as a pytest skip, and :func:`test_skips_are_few_and_say_why` keeps them few.
- ```` ```text ```` (not right after code), ```` ```json ````, ```` ```yaml ````, ```` ```toml ````: shown,
  not run.
  Any other fence (or one without a language) fails :func:`test_every_block_declares_how_it_runs`.

Output: compared with what the block printed to stdout, line by line after trailing spaces are
dropped. ``...`` matches any text (timings, paths). An integer must be printed exactly (a count that
changes fails); a decimal may differ by one unit in the last digit the page shows (a rounding
flicker from another BLAS does not fail, a changed value does).

The docs site itself (mkdocs) is not needed: CI runs ``make test``, which does not install the docs
extra. :func:`test_nav_points_to_pages_that_exist` checks mkdocs.yml's nav against docs/ instead.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

PYTHON = {"python"}
SHELL = {"bash", "sh", "console"}
SHOWN = {"text", "json", "yaml", "toml"}
# Blocks that cannot run in CI (a GPU, torchrun's several processes, a download, the whole suite).
# Each carries its reason; keep them few.
MAX_SKIPS = 8

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)\s*(?P<lang>[\w+-]*)[^`]*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|file)\s*:\s*(?P<value>.*?)\s*-->\s*$")
NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    file: str | None = None
    output: Block | None = None  # the text block that shows this block's output

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with its marker; code blocks linked to their output."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    last_text = ""  # the last non-blank line since the previous block ("" if none)
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            if lines[i].strip():
                last_text = lines[i]
            i += 1
            continue
        indent, ticks = len(fence["indent"]), fence["fence"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        body = "\n".join(line[indent:] if not line[:indent].strip() else line for line in lines[i + 1:end])
        block = Block(page, i + 1, fence["lang"].lower(), body + "\n")
        marker = MARKER.match(last_text)
        if marker is not None:
            setattr(block, marker["kind"], marker["value"])
        previous = blocks[-1] if blocks else None
        follows_code = previous is not None and previous.lang in PYTHON | SHELL
        if (block.lang == "text" and not last_text and follows_code
                and previous.skip is None and previous.file is None):
            previous.output = block
        blocks.append(block)
        last_text = ""
        i = end + 1
    return blocks


def _runnable(block: Block) -> bool:
    return block.lang in PYTHON | SHELL and block.skip is None


ALL_BLOCKS = [block for page in PAGES for block in parse(page)]
RUN_PAGES = [page for page in PAGES if any(_runnable(b) for b in parse(page))]
SKIPPED = [block for block in ALL_BLOCKS if block.skip is not None]


# --------------------------------------------------------------------------------------- output
def matches(expected: str, actual: str) -> str | None:
    """None when ``actual`` shows what ``expected`` says (see the module docstring), else why not."""

    def clean(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())

    want, got = clean(expected), clean(actual)
    pattern, numbers = [], []
    for token in re.split(rf"(\.\.\.|{NUMBER})", want):
        if token == "...":
            pattern.append(r"[\s\S]*?")
        elif token and re.fullmatch(NUMBER, token):
            pattern.append(f"({NUMBER})")
            numbers.append(token)
        else:
            pattern.append(re.escape(token))
    found = re.fullmatch("".join(pattern), got)
    if found is None:
        return f"the text differs\n--- expected\n{want}\n--- printed\n{got}"
    for shown, text in zip(numbers, found.groups()):
        if abs(float(text) - float(shown)) > 1.000001 * _last_digit(shown):
            return f"{text} printed where the page says {shown}\n--- expected\n{want}\n--- printed\n{got}"
    return None


def _last_digit(number: str) -> float:
    """One unit in the last digit shown: 0 for an integer (a count is exact), 1e-4 for 0.3085,
    1e-11 for 2.5e-10."""
    mantissa, _, exponent = number.lower().partition("e")
    if "." not in mantissa:
        return 0.0 if not exponent else 10.0 ** int(exponent)
    decimals = len(mantissa.split(".")[1])
    return 10.0 ** (int(exponent or 0) - decimals)


# ---------------------------------------------------------------------------------------- running
def _commands(block: Block) -> list[tuple[str, str | None]]:
    """``(command, expected output or None)`` for each command of a shell block."""
    result: list[tuple[str, str | None]] = []
    lines = block.code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        elif not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        expected = None
        if block.lang == "console":
            out = []
            while i < len(lines) and not lines[i].startswith("$ "):
                out.append(lines[i])
                i += 1
            expected = "\n".join(out) if any(o.strip() for o in out) else None
        result.append((line, expected))
    return result


def _run_command(command: str, where: str) -> str:
    """Run one ``saddlescope``/``python`` command as a shell would, in this process; its stdout."""
    argv = shlex.split(command, comments=True)
    if argv[0] == "saddlescope":
        module, script, args = "saddlescope.cli", None, argv
    elif argv[0] == "python" and len(argv) > 2 and argv[1] == "-m":
        module, script, args = argv[2], None, argv[2:]
    elif argv[0] == "python" and len(argv) > 1:
        module, script, args = None, argv[1], argv[1:]
    else:
        pytest.fail(f"{where}: a shell block runs only `saddlescope ...` and `python ...` commands; mark "
                    f"others <!-- skip: REASON -->: {command!r}")
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, code = sys.argv, 0
    sys.argv = list(args)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if module is not None:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
    if code != 0:
        pytest.fail(f"{where}: `{command}` exited with {code}\nstdout:\n{stdout.getvalue()}\n"
                    f"stderr:\n{stderr.getvalue()}")
    return stdout.getvalue()


def _run_python(block: Block, namespace: dict) -> str:
    # Padding puts a traceback's line numbers on the page's own lines.
    code = compile("\n" * block.line + block.code, str(block.page.relative_to(ROOT)), "exec")
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
    except BaseException:
        sys.stdout.write(stdout.getvalue())
        raise
    return stdout.getvalue()


def _check_output(block: Block, expected: str | None, printed: str) -> None:
    if expected is None:
        return
    problem = matches(expected, printed)
    if problem is not None:
        pytest.fail(f"{block.where}: the output shown on the page is not what the code prints: {problem}")


@pytest.fixture
def page_sandbox(tmp_path, monkeypatch):
    """The page's working directory, importable as a shell's would be; state restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    dtype = torch.get_default_dtype()
    modules = set(sys.modules)
    yield tmp_path
    torch.set_default_dtype(dtype)
    for name in set(sys.modules) - modules:  # the page's own modules (mymodels.py, ...)
        path = getattr(sys.modules[name], "__file__", None) or ""
        if path.startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_page_examples_run(page, page_sandbox):
    namespace: dict = {"__name__": "__main__"}
    for block in parse(page):
        if not _runnable(block):
            continue
        expected = None if block.output is None else block.output.code
        if block.file is not None:
            target = page_sandbox / block.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code)
            if target.suffix == ".py":
                compile(block.code, block.where, "exec")
        elif block.lang in PYTHON:
            _check_output(block, expected, _run_python(block, namespace))
        else:
            printed = []
            for command, shown in _commands(block):
                out = _run_command(command, block.where)
                printed.append(out)
                _check_output(block, shown, out)
            _check_output(block, expected, "".join(printed))


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_skipped_block(block):
    pytest.skip(f"{block.where} ({block.lang}): {block.skip}")


def test_skips_are_few_and_say_why():
    assert len(SKIPPED) <= MAX_SKIPS, "too many skipped blocks:\n" + "\n".join(
        f"{b.where}: {b.skip}" for b in SKIPPED)
    for block in SKIPPED:
        assert len(block.skip.split()) >= 3, f"{block.where}: a skip needs a reason, got {block.skip!r}"
        assert block.lang in PYTHON | SHELL, f"{block.where}: only code blocks can be skipped"


def test_every_block_declares_how_it_runs():
    for block in ALL_BLOCKS:
        assert block.lang in PYTHON | SHELL | SHOWN, (
            f"{block.where}: fence language {block.lang or '(none)'!r}; use python, bash, console (run), "
            f"or text/json/yaml/toml (shown)")
        if block.file is not None:
            assert block.lang in PYTHON, f"{block.where}: <!-- file: --> goes before a python block"
    runnable = [b for b in ALL_BLOCKS if _runnable(b)]
    assert len(runnable) >= 20, f"only {len(runnable)} runnable blocks found: is the parser broken?"


def test_the_matcher_tolerates_rounding_not_changes():
    assert matches("loss 2.29234 |grad| 0.309", "loss 2.29235 |grad| 0.309") is None
    assert matches("989 negative", "990 negative") is not None
    assert matches("lambda -0.612", "lambda -0.615") is not None
    assert matches("zero means 2e-09", "zero means 2.4e-09") is None and matches("2e-09", "4e-09") is not None
    assert matches("note: path exact: ...\nend", "note: path exact: predicted 0.8 s\nend") is None
    assert matches("verdict: saddle", "verdict: minimum") is not None


# -------------------------------------------------------------------------------- site structure
def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:"):]
    return re.findall(r"^\s*-\s*(?:[^\n]*?:\s*)?([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def test_nav_points_to_pages_that_exist():
    pages = _nav_pages()
    assert "index.md" in pages and len(pages) >= 15
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist: {missing}"
    assert len(pages) == len(set(pages)), "a page is in the nav twice"
    names = [str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")]
    orphans = sorted(name for name in names if name not in pages)
    assert not orphans, f"pages not in mkdocs.yml's nav (no reader finds them): {orphans}"


def test_the_api_reference_names_every_public_name():
    import saddlescope

    table = (DOCS / "reference" / "index.md").read_text()
    missing = [name for name in saddlescope.__all__ if f"`ss.{name}`" not in table]
    assert not missing, f"docs/reference/index.md does not list {missing} (from saddlescope.__all__)"


def test_snippets_and_readme_links_resolve():
    for page in DOCS.rglob("*.md"):
        for name, section in re.findall(r'--8<--\s+"([^":]+)(?::(\w+))?"', page.read_text()):
            source = ROOT / name
            assert source.is_file(), f"{page}: includes {name}, which does not exist"
            if section:
                text = source.read_text()
                assert f"--8<-- [start:{section}]" in text and f"--8<-- [end:{section}]" in text, (
                    f"{page}: includes section {section!r} of {name}, which has no such markers")
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
