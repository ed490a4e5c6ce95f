"""Every Python example in docs/ and in the package's docstrings runs as written (and the
docstring examples that say they are type-checked pass ``mypy --strict``).

The README's example and the plugins' README consumers are run by ``tests/test_docs.py`` and
the plugin tests; the layout examples of ``docs/rules.md`` by ``tests/test_self_contained.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import doctest
import io
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

import watcher.live.fanotify
import watcher.live.inotify
from watcher import testing
from watcher.delivery import sinks as sinks_mod
from watcher.http import view as view_mod

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def python_blocks(path: Path) -> list[str]:
    """The fenced ``python`` blocks of a markdown file."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)


def docstring_example(module: Any) -> str:
    """The indented block after ``Example...::`` in a module docstring."""
    doc = module.__doc__ or ""
    match = re.search(r"Example[^\n]*::\n\n((?:    .*\n|\n)+)", doc)
    assert match, f"{module.__name__} has no example"
    return textwrap.dedent(match.group(1))


def run(code: str, namespace: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Execute ``code``; its namespace and what it printed."""
    namespace = {"__name__": "example", **(namespace or {})}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<example>", "exec"), namespace)
    return namespace, out.getvalue()


def test_every_doc_with_python_has_a_test_here() -> None:
    """No docs/ page has a Python example that no test runs (operations.md's consumer that
    puts each node's events back in order is run by ``tests/test_deploy_nats.py``, and
    embedding.md's by ``tests/test_feed.py``, on a real overlay)."""
    with_python = {p.name for p in DOCS.glob("*.md") if python_blocks(p)}
    assert with_python == {"events.md", "inotify.md", "sinks.md", "operations.md", "embedding.md"}


def test_events_consumer_rebuilds_the_change_lists() -> None:
    """docs/events.md: the consumer, fed a stream with re-sends, holds every mount's list."""
    (code,) = python_blocks(DOCS / "events.md")
    records, expected = testing.change_list_records()
    events = [orjson.loads(r.body) for r in [*records[:5], *records]]  # a re-sent prefix
    namespace, _ = run(code, {"events": events, "base64": base64})
    assert namespace["state"] == expected


def test_inotify_example_prints_the_new_name() -> None:
    """docs/inotify.md: the adapter's example runs and sees the file it made."""
    (code,) = python_blocks(DOCS / "inotify.md")
    _, printed = run(code)
    assert printed.strip() == "[b'new']"


async def test_sink_example_keeps_the_contract(tmp_path: Path) -> None:
    """docs/sinks.md: the example sink, and the example test of it, pass the contract."""
    sink_code, test_code = python_blocks(DOCS / "sinks.md")
    namespace, _ = run(sink_code + "\n" + test_code)
    await namespace["test_counting_sink_keeps_the_contract"](tmp_path)
    assert (tmp_path / "counts").read_text().splitlines()


def test_inotify_doctest() -> None:
    """The ``Inotify`` docstring example runs as shown."""
    result = doctest.testmod(watcher.live.inotify, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="fanotify marks need CAP_SYS_ADMIN")
def test_fanotify_doctest() -> None:
    """The ``Fanotify`` docstring example runs as shown."""
    result = doctest.testmod(watcher.live.fanotify, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_sink_docstring_example_is_a_sink_that_prints() -> None:
    """``watcher.delivery.sinks``: the example class is a ``Sink`` and prints each event."""
    prelude = "from collections.abc import Mapping, Sequence\n"
    prelude += "from watcher.delivery.sinks import Health, Record\n"
    namespace, _ = run(prelude + docstring_example(sinks_mod))
    sink = namespace["PrintSink"]("p", {})
    assert isinstance(sink, sinks_mod.Sink)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        asyncio.run(sink.send(testing.make_records(1, 2)))
    assert [orjson.loads(line)["id"] for line in out.getvalue().splitlines()] == [
        "test:1:1",
        "test:1:2",
    ]


@pytest.mark.parametrize(
    ("module", "prelude"),
    [
        (
            sinks_mod,
            "from collections.abc import Mapping, Sequence\n"
            "from watcher.delivery.sinks import Health, Record, Sink, SinkFactory\n",
        ),
        (view_mod, "from watcher.http.view import ServiceView\n"),
    ],
    ids=["sinks", "view"],
)
def test_docstring_examples_are_type_checked(module: Any, prelude: str, tmp_path: Path) -> None:
    """The docstring examples that say they are type-checked pass ``mypy --strict``."""
    api = pytest.importorskip("mypy.api")
    code = prelude + docstring_example(module)
    if module is sinks_mod:  # and the example class is a SinkFactory, as the text promises
        code += "\n\nfactory: SinkFactory = PrintSink\n"
    path = tmp_path / "example.py"
    path.write_text(code)
    out, err, status = api.run(["--strict", "--no-incremental", str(path)])
    assert status == 0, out + err
