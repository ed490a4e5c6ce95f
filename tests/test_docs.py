"""The docs are executed: README commands, its Python example, and every TOML config example.

Code blocks are read straight from the Markdown. A TOML block is a whole config when it has
``[[mounts]]`` or ``[discovery]``; a block of other config tables (``[sinks.NAME]``, ``[api]``)
is a fragment and is parsed inside a minimal whole config; a ``pyproject.toml`` snippet (its
tables are ``project``, ``tool`` or ``build-system``) only has to be valid TOML; a block with a
``# fragment`` line is not parsed as a config at all.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from overlay import LayerEntry, build_layer, requires_overlay

from watcher.cli.main import build_parser
from watcher.service import config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEPLOY_CONFIG = REPO / "deploy/layerwatch.toml"
MINIMAL_CONFIG: dict[str, Any] = {
    "mounts": [{"name": "doc", "upper": "/srv/doc/rw", "lowers": ["/srv/doc/base"]}]
}
"""A whole config that fragments are parsed inside (a detached mount: no paths are read)."""
PYPROJECT_TABLES = {"project", "tool", "build-system"}


@dataclass(frozen=True, slots=True)
class Block:
    """A fenced code block of a Markdown file."""

    file: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    text: str

    @property
    def where(self) -> str:
        """``path:line``, relative to the repository."""
        return f"{self.file.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> Iterator[Block]:
    """Every fenced (```) code block of the Markdown file ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: unclosed code block"
        yield Block(path, start + 1, fence.group(1), "\n".join(body) + "\n")
        i += 1


def section_blocks(path: Path, heading: str) -> list[Block]:
    """The code blocks between ``## heading`` and the next ``## `` heading of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"## {heading}"]
    assert len(starts) == 1, f"{path.name} has {len(starts)} '## {heading}' headings"
    first = starts[0] + 1
    end = next((i for i in range(first, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [b for b in code_blocks(path) if first < b.line <= end]


def commands(block: Block) -> list[str]:
    """The shell commands of ``block``: non-blank, non-comment lines, trailing comments cut."""
    out = []
    for line in block.text.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            out.append(command)
    return out


def subcommands() -> set[str]:
    """Every subcommand name of the CLI parser."""
    return {
        name
        for action in build_parser()._actions
        if hasattr(action, "choices") and isinstance(action.choices, dict)
        for name in action.choices
    }


# ---------------------------------------------------------------------------------------------
# README


def test_quick_start_is_two_commands_the_demo_and_ci() -> None:
    """README's Quick start block is exactly two commands: the demo, then `bash .ci/run`."""
    blocks = section_blocks(README, "Quick start")
    assert blocks, "Quick start has no code block"
    lines = commands(blocks[0])
    assert len(lines) == 2, lines
    first, second = lines
    assert re.search(r"(^|&& )layerwatch demo$", first), first
    assert second == "bash .ci/run"
    assert (REPO / ".ci/run").is_file()


def test_every_command_in_using_it_exists_and_parses() -> None:
    """Each line of README's "Using it" block is a real subcommand with options that parse."""
    blocks = section_blocks(README, "Using it")
    assert blocks, "'Using it' has no code block"
    lines = commands(blocks[0])
    assert len(lines) >= 3
    known = subcommands()
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "layerwatch", line
        assert argv[1] in known, f"{line!r}: no subcommand {argv[1]!r}"
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{line!r} does not parse: {stderr.getvalue().strip()}")


def _python_example() -> str:
    """The one ```python block of the README."""
    blocks = [b for b in code_blocks(README) if b.lang == "python"]
    assert len(blocks) == 1, [b.where for b in blocks]
    return blocks[0].text


def _compute_paths(code: str) -> tuple[str, list[str]]:
    """The upper and the lowers (top first) the example passes to ``compute``, as literals."""
    calls = [
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "compute"
    ]
    assert len(calls) == 1, "the example should call compute() once"
    upper, lowers = calls[0].args[:2]
    assert isinstance(upper, ast.Constant)
    assert isinstance(upper.value, str)
    assert isinstance(lowers, ast.List)
    names = [e.value for e in lowers.elts if isinstance(e, ast.Constant)]
    assert len(names) == len(lowers.elts) >= 1
    return upper.value, [str(n) for n in names]


@requires_overlay
def test_readme_python_example_prints_the_change_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's Python example, run on real branches at its paths (moved under tmp), prints them."""
    code = _python_example()
    upper, lowers = _compute_paths(code)
    where = {p: tmp_path / p.lstrip("/") for p in [upper, *lowers]}
    for path in where.values():
        path.mkdir(parents=True)
    for literal, path in where.items():
        code = code.replace(f'"{literal}"', repr(str(path)))
    base, top = where[lowers[-1]], where[lowers[0]]
    build_layer(str(base), [LayerEntry("file", p) for p in (b"etc/motd", b"etc/host", b"opt/x")])
    if top != base:
        build_layer(str(top), [LayerEntry("whiteout", b"opt/x")])
    build_layer(
        str(where[upper]),
        [
            LayerEntry("whiteout", b"etc/host"),
            LayerEntry("file", b"etc/new"),
            LayerEntry("file", b"opt/x"),
        ],
    )

    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})

    printed: list[tuple[str, bytes]] = []
    for line in capsys.readouterr().out.splitlines():
        kind, _, shown = line.partition(" ")
        raw = ast.literal_eval(shown) if shown.startswith("b'") else shown.encode()
        assert isinstance(raw, bytes), line
        printed.append((kind, raw))
    expected = [("C", b"/etc"), ("D", b"/etc/host"), ("A", b"/etc/new"), ("C", b"/opt")]
    # /opt/x is new where the top layer whites it out, changed where it is the base's file.
    expected.append(("A" if top != base else "C", b"/opt/x"))
    assert printed == expected


# ---------------------------------------------------------------------------------------------
# TOML examples


def _toml_blocks() -> list[Block]:
    """Every ```toml block of README, docs/ and the plugins' READMEs."""
    files = [README, *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "plugins").glob("*/README.md"))
    return [b for f in files for b in code_blocks(f) if b.lang == "toml"]


TOML_BLOCKS = _toml_blocks()


def test_the_docs_have_toml_examples() -> None:
    """The TOML example collection below is not silently empty."""
    assert len(TOML_BLOCKS) >= 3
    assert any(b.file.name == "sinks.md" for b in TOML_BLOCKS)


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=[b.where for b in TOML_BLOCKS])
def test_toml_example_parses(block: Block) -> None:
    """A TOML example is valid TOML and, unless a pyproject snippet, a valid config (fragment)."""
    data = tomllib.loads(block.text)
    if re.search(r"^# fragment\b", block.text, re.MULTILINE):
        return
    if set(data) <= PYPROJECT_TABLES:
        assert "project" in data or "tool" in data or "build-system" in data
        return
    if "mounts" in data or "discovery" in data:
        config.parse(data)
        return
    parsed = config.parse({**MINIMAL_CONFIG, **data})
    for name in data.get("sinks", {}):
        assert name in {s.name for s in parsed.sinks}


def test_deploy_config_parses() -> None:
    """deploy/layerwatch.toml is a valid whole config."""
    cfg = config.parse(tomllib.loads(DEPLOY_CONFIG.read_text(encoding="utf-8")))
    assert cfg.mounts
    assert cfg.sinks


def _commented_mounts(text: str) -> list[str]:
    """The commented-out ``# [[mounts]]`` alternatives of a config, uncommented."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "# [[mounts]]":
            continue
        body = ["[[mounts]]"]
        for follow in lines[i + 1 :]:
            key = re.match(r"^# ([a-z_]+ = .*)$", follow)
            if key is None:
                break
            body.append(key.group(1))
        found.append("\n".join(body) + "\n")
    return found


def test_deploy_config_commented_alternatives_parse() -> None:
    """Each commented-out [[mounts]] alternative in deploy/layerwatch.toml is valid when enabled."""
    text = DEPLOY_CONFIG.read_text(encoding="utf-8")
    base = len(config.parse(tomllib.loads(text)).mounts)
    alternatives = _commented_mounts(text)
    assert alternatives, "expected commented-out mount alternatives"
    for alternative in alternatives:
        cfg = config.parse(tomllib.loads(text + "\n" + alternative))
        assert len(cfg.mounts) == base + 1, alternative
