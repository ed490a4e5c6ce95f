"""The repository stands on its own, and the change-list rules of ``docs/rules.md`` are run.

Two kinds of check:

- no file tracked by git (``bench/`` aside) points at the design document that lives outside
  the repository: the rules are written in ``docs/rules.md`` and nowhere else;
- every ```` ```layout ```` block of ``docs/rules.md`` (a lower stack, an upper dir and the
  ``docker diff`` lines expected; the little language is described at the top of that file) is
  built with ``overlay.build_layer`` and ``watcher.compute`` must print exactly its lines.
  Overlay-format examples are also mounted and compared the way moby does (merged view
  against base view, ``oracle.changes_dirs``), so each example's answer is Docker's, not only
  ours.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from oracle import changes_dirs
from overlay import (
    MOUNT_OPTIONS,
    LayerEntry,
    build_layer,
    mount_base,
    mount_overlay,
    requires_overlay,
)

from watcher.core.rules import compute

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "docs/rules.md"
RULE_COUNT = 12

OUTSIDE_REFERENCE = re.compile(r"DESIGN(?:[.]md|\s+section|\s*§)|\.\./shared".encode())
"""A pointer at the design document kept outside the repository (its name, a section of it,
or the directory beside the checkout where it lives)."""

requires_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the examples make char-device whiteouts and trusted.* xattrs",
)


# ---------------------------------------------------------------------------------------------
# No pointers outside the repository


def _tracked_files() -> list[str]:
    """Every file git tracks, relative to the repository root."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to list with git ls-files")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    return [os.fsdecode(name) for name in out.split(b"\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    """No tracked file outside bench/ names the outside design document or its directory."""
    offenders = []
    for name in _tracked_files():
        if name.startswith("bench/"):
            continue
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the working tree, not yet committed
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                offenders.append(f"{name}:{number}: {line.decode(errors='replace').strip()}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------------------------------
# The layout language of docs/rules.md

_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|n|t|\\)")
_DEFAULT_MTIME = "1700000000"
_KINDS = {"dir", "opaque", "file", "symlink", "hardlink", "fifo", "chardev", "whiteout"}
_KEYS = {"data", "mode", "mtime", "owner", "rdev", "size"}


def unescape(token: str) -> bytes:
    r"""A token of the language as bytes: ``\xHH``, ``\n``, ``\t`` and ``\\`` are escapes."""
    raw = token.encode("utf-8")
    if b"\\" in _ESCAPE.sub(b"", raw):
        raise ValueError(f"unknown escape in {token!r}")

    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code.startswith(b"x"):
            return bytes([int(code[1:], 16)])
        return {b"n": b"\n", b"t": b"\t", b"\\": b"\\"}[code]

    return _ESCAPE.sub(one, raw)


@dataclass(frozen=True, slots=True)
class Spec:
    """One entry line: ``PATH KIND [KEY=VALUE]...`` (a key with a dot in it is an xattr)."""

    path: bytes
    kind: str
    options: dict[str, str]
    xattrs: dict[bytes, bytes]

    @property
    def relative(self) -> bytes:
        """The path inside the layer directory."""
        return self.path.lstrip(b"/")

    @property
    def mode(self) -> int:
        """The permission bits (``mode=``, octal; 0755 for directories, 0644 otherwise)."""
        default = "0755" if self.kind in ("dir", "opaque") else "0644"
        return int(self.options.get("mode", default), 8)

    @property
    def mtime(self) -> tuple[int, int]:
        """(seconds, extra ns) from ``mtime=SECONDS[.FRACTION]``."""
        seconds, _, fraction = self.options.get("mtime", _DEFAULT_MTIME).partition(".")
        return int(seconds), int(fraction.ljust(9, "0")) if fraction else 0

    def layer_entry(self) -> LayerEntry:
        """The ``overlay.LayerEntry`` that builds this line (before the extras: owner, rdev,
        size, xattrs)."""
        data = unescape(self.options.get("data", ""))
        if self.kind == "hardlink":
            data = data.lstrip(b"/")
        seconds, extra_ns = self.mtime
        return LayerEntry(
            self.kind,
            self.relative,
            data=data,
            mode=self.mode,
            mtime=seconds,
            mtime_extra_ns=extra_ns,
        )


@dataclass(slots=True)
class Example:
    """One ```` ```layout ```` block: where it is, what to build, what ``docker diff`` says."""

    rule: int
    """The number of the rule section it sits in (0: before the first rule)."""
    line: int
    lowers: list[list[Spec]] = field(default_factory=list)
    """Top first."""
    upper: list[Spec] = field(default_factory=list)
    diff: list[tuple[str, bytes]] = field(default_factory=list)
    compute: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A test id: the rule and the line of the block."""
        return f"rule{self.rule}-line{self.line}"

    @property
    def whiteouts(self) -> str:
        """The whiteout format of the layers (``compute whiteouts=``; overlay by default)."""
        return self.compute.get("whiteouts", "overlay")

    @property
    def xattr_prefix(self) -> bytes:
        """Where overlay xattrs are read (``compute xattr_prefix=``; ``trusted.overlay.``)."""
        return self.compute.get("xattr_prefix", "trusted.overlay.").encode()

    @property
    def aufs(self) -> bool:
        """Whether the layers are in aufs format (nothing here can mount them)."""
        return self.whiteouts == "aufs"


def _spec(tokens: list[str], where: str) -> Spec:
    """Parse the tokens of one entry line."""
    if len(tokens) < 2 or tokens[1] not in _KINDS:
        raise ValueError(f"{where}: expected 'PATH KIND [KEY=VALUE]...'")
    path = unescape(tokens[0])
    if not path.startswith(b"/") or path == b"/":
        raise ValueError(f"{where}: paths are absolute and not the root")
    options: dict[str, str] = {}
    xattrs: dict[bytes, bytes] = {}
    for token in tokens[2:]:
        key, eq, value = token.partition("=")
        if not eq:
            raise ValueError(f"{where}: {token!r} is not KEY=VALUE")
        if "." in key:
            xattrs[key.encode()] = (
                bytes.fromhex(value[2:]) if value.startswith("0x") else unescape(value)
            )
        elif key in _KEYS:
            options[key] = value
        else:
            raise ValueError(f"{where}: unknown key {key!r}")
    return Spec(path, tokens[1], options, xattrs)


def parse_layout(text: str, rule: int, line: int) -> Example:
    """Parse the body of one ```` ```layout ```` block."""
    example = Example(rule, line)
    section: list[Spec] | None = None
    in_diff = False
    for offset, raw in enumerate(text.splitlines(), 1):
        where = f"{RULES.name}:{line + offset}"
        content = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not content:
            continue
        tokens = content.split()
        if not raw[0].isspace():
            head = tokens[0]
            in_diff = False
            if head == "lower" and len(tokens) == 1:
                section = []
                example.lowers.append(section)
            elif head == "upper" and len(tokens) == 1:
                section = example.upper
            elif head == "diff" and len(tokens) == 1:
                section, in_diff = None, True
            elif head == "compute":
                section = None
                for token in tokens[1:]:
                    key, _, value = token.partition("=")
                    if key not in ("whiteouts", "xattr_prefix"):
                        raise ValueError(f"{where}: unknown compute option {key!r}")
                    example.compute[key] = value
            else:
                raise ValueError(f"{where}: expected lower, upper, diff or compute")
        elif in_diff:
            if len(tokens) != 2 or tokens[0] not in ("A", "C", "D"):
                raise ValueError(f"{where}: a diff line is 'A|C|D PATH'")
            example.diff.append((tokens[0], unescape(tokens[1])))
        elif section is not None:
            section.append(_spec(tokens, where))
        else:
            raise ValueError(f"{where}: an indented line outside lower, upper and diff")
    if not example.lowers:
        raise ValueError(f"{RULES.name}:{line}: an example needs at least one lower layer")
    return example


def rules_examples() -> Iterator[Example]:
    """Every ```` ```layout ```` block of ``docs/rules.md``, with the rule it belongs to."""
    lines = RULES.read_text(encoding="utf-8").splitlines()
    rule = 0
    i = 0
    while i < len(lines):
        heading = re.match(r"^## (\d+)\. ", lines[i])
        if heading:
            rule = int(heading.group(1))
        if lines[i].strip() == "```layout":
            start = i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            yield parse_layout("\n".join(lines[start:i]), rule, start)
        i += 1


EXAMPLES = list(rules_examples())
OVERLAY_EXAMPLES = [e for e in EXAMPLES if not e.aufs]


# ---------------------------------------------------------------------------------------------
# Building an example


def _build(root: Path, specs: list[Spec]) -> None:
    """Build one layer: ``build_layer`` first, then owner, rdev, size and xattrs, then every
    declared mtime again (deepest first), since those steps move mtimes."""
    root.mkdir(parents=True)
    build_layer(str(root), [spec.layer_entry() for spec in specs])
    base = os.fsencode(root)
    for spec in specs:
        path = os.path.join(base, spec.relative)
        if "rdev" in spec.options:
            major, minor = (int(n) for n in spec.options["rdev"].split(":"))
            os.unlink(path)
            os.mknod(path, stat.S_IFCHR | spec.mode, os.makedev(major, minor))
        if "owner" in spec.options:
            uid, gid = (int(n) for n in spec.options["owner"].split(":"))
            os.lchown(path, uid, gid)
            if spec.kind != "symlink":
                os.chmod(path, spec.mode)  # chown clears set-id bits
        if "size" in spec.options:
            os.truncate(path, int(spec.options["size"]))
        for name, value in spec.xattrs.items():
            os.setxattr(path, name, value, follow_symlinks=False)
    for spec in sorted(specs, key=lambda s: s.path.count(b"/"), reverse=True):
        if spec.kind == "hardlink":
            continue
        seconds, extra_ns = spec.mtime
        ns = seconds * 1_000_000_000 + extra_ns
        os.utime(os.path.join(base, spec.relative), ns=(ns, ns), follow_symlinks=False)


def build_example(example: Example, tmp_path: Path) -> tuple[str, list[str]]:
    """Build the example's layers under ``tmp_path``; return (upper, lowers top first)."""
    lowers = []
    for index, specs in enumerate(example.lowers):
        layer = tmp_path / f"lower{index}"
        _build(layer, specs)
        lowers.append(str(layer))
    upper = tmp_path / "ovl/upper"
    _build(upper, example.upper)
    return str(upper), lowers


def _mount_options(example: Example) -> str:
    """The overlay options that let the kernel read the example's upper as it is meant."""
    names = {name for spec in example.upper for name in spec.xattrs}
    if example.xattr_prefix == b"user.overlay.":
        return "userxattr,metacopy=off,index=off"
    if any(name.endswith(b"overlay.metacopy") for name in names):
        return "redirect_dir=on,metacopy=on,index=off"
    if any(name.endswith(b"overlay.redirect") for name in names):
        return "redirect_dir=on,metacopy=off,index=off"
    return MOUNT_OPTIONS


# ---------------------------------------------------------------------------------------------
# The examples


def test_rules_are_numbered_1_to_12_and_each_has_an_example() -> None:
    """docs/rules.md has the rules 1 to 12 in order, each with at least one layout example."""
    text = RULES.read_text(encoding="utf-8")
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", text, re.MULTILINE)]
    assert numbers == list(range(1, RULE_COUNT + 1))
    missing = set(numbers) - {e.rule for e in EXAMPLES}
    assert not missing, f"rules without a layout example: {sorted(missing)}"


@requires_root
@pytest.mark.root
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_rules_example_computes_its_diff(example: Example, tmp_path: Path) -> None:
    """watcher.compute on the example's layers prints exactly the example's diff lines."""
    upper, lowers = build_example(example, tmp_path)
    changes = compute(upper, lowers, whiteouts=example.whiteouts, xattr_prefix=example.xattr_prefix)
    got = [(change.kind.value, change.path) for change in changes]
    assert len(set(example.diff)) == len(example.diff), "an example lists a line twice"
    assert got == sorted(example.diff, key=lambda kind_path: kind_path[1])


@requires_overlay
@pytest.mark.root
@pytest.mark.parametrize("example", OVERLAY_EXAMPLES, ids=[e.name for e in OVERLAY_EXAMPLES])
def test_rules_example_is_what_the_views_comparison_gives(example: Example, tmp_path: Path) -> None:
    """Mounted, the example's merged view against its base view (moby's ChangesDirs) gives
    the same lines: the documented answer is Docker's."""
    _upper, lowers = build_example(example, tmp_path)
    with (
        mount_overlay(str(tmp_path / "ovl"), lowers, options=_mount_options(example)) as ovl,
        mount_base(lowers) as base,
    ):
        got = changes_dirs(ovl.merged, base)
    assert [(kind, path) for path, kind in got] == sorted(example.diff, key=lambda kp: kp[1])
