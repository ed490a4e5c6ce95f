"""``layerwatch completion bash|zsh`` and ``layerwatch man``, run in the real shells and the
real man/groff.

The bash script is sourced in a real bash with ``COMP_WORDS``/``COMP_CWORD`` set as readline
sets them, and must offer what the parser has. zsh's completion system only runs inside an
interactive line editor, so the zsh function is run in a real zsh with ``_arguments`` and
``_describe`` stubbed (they print what they were given): the script's own logic is real.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from watcher.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(
    name
    for action in build_parser()._actions
    if hasattr(action, "choices") and isinstance(action.choices, dict)
    for name in action.choices
)


def _layerwatch(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "watcher.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    return proc.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated bash completion script, in a file."""
    path = tmp_path_factory.mktemp("completion") / "layerwatch.bash"
    path.write_text(_layerwatch("completion", "bash"))
    return path


def _complete(script: Path, *words: str, cwd: Path = REPO) -> list[str]:
    """What the bash completion offers for ``layerwatch WORDS`` (the last word being typed)."""
    array = " ".join(f"'{w}'" for w in ("layerwatch", *words))
    program = (
        f"source {script}; COMP_WORDS=({array}); COMP_CWORD={len(words)}; _layerwatch; "
        "printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=cwd,
    )
    return [line for line in proc.stdout.splitlines() if line]


def test_bash_script_is_valid_bash(bash_script: Path) -> None:
    """`bash -n` accepts the script."""
    subprocess.run(["bash", "-n", str(bash_script)], check=True, timeout=30)


def test_bash_offers_every_subcommand(bash_script: Path) -> None:
    """With nothing typed, every subcommand (and --version) is offered; a prefix narrows it."""
    offered = _complete(bash_script, "")
    assert set(COMMANDS) <= set(offered)
    assert "--version" in offered
    assert _complete(bash_script, "co") == ["completion"]


def test_bash_offers_a_commands_options_and_their_values(bash_script: Path, tmp_path: Path) -> None:
    """After a subcommand: its options, the choices of an option, directories for DIR values."""
    assert {"--exit-code", "--format", "--image", "--docker-root"} <= set(
        _complete(bash_script, "diff", "--")
    )
    assert _complete(bash_script, "diff", "--whiteouts", "") == ["overlay", "aufs"]
    assert _complete(bash_script, "completion", "") == ["bash", "zsh"]
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somefile").touch()
    assert _complete(bash_script, "diff", "--upper", "some", cwd=tmp_path) == ["somedir"]


requires_zsh = pytest.mark.skipif(
    shutil.which("zsh") is None, reason="zsh not installed (Debian zsh)"
)

ZSH_STUBS = """
_arguments() {
    if [[ $1 == -C ]]; then state=$LW_STATE; else print -rl -- "$@"; fi
}
_describe() { print -rl -- "${commands[@]}" }
words=(${=LW_WORDS})
"""


def _zsh(script: Path, state: str, words: str) -> list[str]:
    proc = subprocess.run(
        ["zsh", "-f", "-c", f"{ZSH_STUBS}\nsource {script}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"LW_STATE": state, "LW_WORDS": words, "PATH": "/usr/bin:/bin"},
    )
    assert proc.stderr == ""
    return proc.stdout.splitlines()


@requires_zsh
def test_zsh_function_is_valid_and_offers_commands_and_options(tmp_path: Path) -> None:
    """The zsh function parses (`zsh -n`), describes every subcommand, and gives a
    subcommand's options to _arguments."""
    script = tmp_path / "_layerwatch"
    script.write_text(_layerwatch("completion", "zsh"))
    assert script.read_text().startswith("#compdef layerwatch\n")
    subprocess.run(["zsh", "-n", str(script)], check=True, timeout=30)
    described = _zsh(script, "command", "")
    assert sorted(line.split(":", 1)[0] for line in described) == COMMANDS
    specs = _zsh(script, "argument", "diff")
    assert (
        "--exit-code[exit 1 when there are changes, 0 when none, 2 on an error (like git diff)]"
        in specs
    )
    assert (
        "--whiteouts[how the branches mark deletions (default: overlay)]:WHITEOUTS:(overlay aufs)"
        in specs
    )


def test_man_page_renders_every_command() -> None:
    """`layerwatch man` is roff that man (or groff) renders without a warning, with a
    section per subcommand and the exit statuses."""
    page = _layerwatch("man")
    assert page.startswith(".TH LAYERWATCH 1 ")
    for command in COMMANDS:
        assert f'.SS "{command}"' in page
    if shutil.which("groff") is None:
        pytest.skip("groff not installed (Debian groff-base): roff structure checked only")
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-P-cbou"],
        input=page,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stderr == ""
    text = proc.stdout
    for heading in ("NAME", "SYNOPSIS", "COMMANDS", "EXIT STATUS", "SEE ALSO"):
        assert f"\n{heading}\n" in text
    assert "layerwatch diff [--lower DIR]..." in " ".join(text.split())
    assert "--exit-code" in text
