"""/metrics, read by Prometheus's own text parser (``prometheus_client``), from a real service:
real overlay mounts, discovery, a real sink, the API on its unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from overlay import LayerEntry, build_layer, mount_overlay, requires_overlay
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from watcher.cli.main import service_for
from watcher.delivery.events import CHANGE
from watcher.delivery.histogram import Histogram
from watcher.http.metrics import Exposition, version
from watcher.service.config import parse
from watcher.service.service import Service

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def families(text: str) -> dict[str, Metric]:
    """The exposition's families by name, checked as Prometheus reads them: every family has
    HELP and TYPE, counters' samples end in _total, histograms are whole and consistent."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge", "histogram"), (family.name, family.type)
        assert family.documentation, f"{family.name} has no HELP"
        if family.type == "counter":
            assert all(s.name == f"{family.name}_total" for s in family.samples), family.name
        if family.type == "histogram":
            check_histogram(family)
        found[family.name] = family
    return found


def check_histogram(family: Metric) -> None:
    """Per label set: buckets ascending by le and cumulative, +Inf last and equal to _count,
    a _sum that is not negative."""
    series: dict[tuple[tuple[str, str], ...], dict[str, list[tuple[float, float]]]] = {}
    for sample in family.samples:
        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        kind = sample.name.removeprefix(family.name)
        bound = float(sample.labels["le"]) if kind == "_bucket" else 0.0
        series.setdefault(labels, {}).setdefault(kind, []).append((bound, sample.value))
    assert series, f"{family.name}: no samples"
    for labels, parts in series.items():
        assert set(parts) == {"_bucket", "_sum", "_count"}, (family.name, labels)
        buckets = parts["_bucket"]
        bounds = [b for b, _ in buckets]
        counts = [c for _, c in buckets]
        assert bounds == sorted(bounds), (family.name, labels)
        assert math.isinf(bounds[-1]), (family.name, labels)
        assert counts == sorted(counts), f"{family.name}{labels}: buckets not cumulative"
        assert counts[-1] == parts["_count"][0][1], f"{family.name}{labels}: +Inf != _count"
        assert parts["_sum"][0][1] >= 0


def monotonic_samples(found: dict[str, Metric]) -> Samples:
    """Every sample that must never decrease: counters, and histograms' buckets, sums, counts."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in found.values()
        if family.type in ("counter", "histogram")
        for s in family.samples
    }


def values(found: dict[str, Metric], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` (a sample name, such as ``layerwatch_resyncs_total``)."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in found.values()
        for s in family.samples
        if s.name == name
    }


# -- the writer -----------------------------------------------------------------------------


def test_histograms_render_as_prometheus_reads_them() -> None:
    """A written histogram parses back with its buckets, sum and count, labels kept."""
    h = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.5, 0.5, 7.0):
        h.observe(seconds)
    text = Exposition()
    text.family("x_seconds", "histogram", "A test.")
    text.histogram("x_seconds", h, sink='a "b"')
    (family,) = families(text.render().decode()).values()
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got == {
        ("layerwatch_x_seconds_bucket", "0.1"): 1,
        ("layerwatch_x_seconds_bucket", "1.0"): 3,
        ("layerwatch_x_seconds_bucket", "+Inf"): 4,
        ("layerwatch_x_seconds_sum", None): 8.05,
        ("layerwatch_x_seconds_count", None): 4,
    }
    assert all(s.labels["sink"] == 'a "b"' for s in family.samples)


@pytest.mark.parametrize("bounds", [(), (1.0, 0.5), (1.0, 1.0), (1.0, math.inf)])
def test_bad_bucket_bounds_are_refused(bounds: Iterable[float]) -> None:
    """Bounds must be ascending, finite and not empty (+Inf is implied)."""
    with pytest.raises(ValueError, match="bucket bounds"):
        Histogram(tuple(bounds))


# -- a real service -------------------------------------------------------------------------


def _lower(root: Path) -> str:
    path = root / "lower"
    path.mkdir(parents=True)
    build_layer(str(path), [LayerEntry("file", b"etc/motd", b"hi\n")])
    return str(path)


@contextlib.asynccontextmanager
async def running(config: dict[str, Any]) -> AsyncIterator[Service]:
    """The service ``layerwatch run`` would run (its API included), started, then stopped."""
    service = service_for(parse(config))
    task = asyncio.create_task(service.run(signals=False))
    try:
        async with asyncio.timeout(30):
            await service.started.wait()
        yield service
    finally:
        service.stop.set()
        await asyncio.wait_for(task, 30)


async def until_followed(service: Service, count: int) -> None:
    """Wait (bounded) until discovery follows ``count`` mounts."""
    async with asyncio.timeout(15):
        while len(service.mounts) != count:  # noqa: ASYNC110 (another task's state: poll)
            await asyncio.sleep(0.02)


@requires_overlay
@pytest.mark.root
async def test_metrics_parse_and_counters_hold_while_a_mount_leaves(tmp_path: Path) -> None:
    """Scraped while a discovered mount is followed (after a restart: it has a resync) and
    again after it left: the text parses (HELP and TYPE everywhere, _total counters,
    consistent histograms), no counter or histogram sample decreases or vanishes, the mount's
    resyncs stay counted, and what the runner, the spool and the intake measure is there."""
    sock = tmp_path / "api.sock"
    (tmp_path / "a").mkdir()
    config = {
        "discovery": {"mountpoint_glob": f"{tmp_path}/*/merged", "interval": "0.2s"},
        "spool": {"path": str(tmp_path / "spool.db")},
        "api": {"socket": str(sock)},
        "sinks": {
            "audit": {
                "type": "jsonl",
                "path": str(tmp_path / "events.jsonl"),
                "filter": {"kinds": ["D"]},
            }
        },
    }

    async def scrape(session: aiohttp.ClientSession) -> dict[str, Metric]:
        async with session.get("http://lw/metrics") as resp:
            assert resp.status == 200
            return families(await resp.text())

    with contextlib.ExitStack() as mounted:
        ovl = mounted.enter_context(mount_overlay(str(tmp_path / "a"), [_lower(tmp_path / "la")]))
        async with running(config) as service:  # the first run: the mount's list is saved
            await until_followed(service, 1)
        first_head = service.head_seq
        async with running(config) as service:
            await until_followed(service, 1)  # again, with a resync (reason restart)
            (found,) = service.mounts
            await asyncio.to_thread(Path(ovl.merged, "new").write_bytes, b"x")
            await service.sync()
            async with asyncio.timeout(15):
                while service.sinks["audit"].lag:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            # What the filter (kinds = D) dropped in this run: every other change event. How
            # many there are depends on how the write's events fell into drains (1 to 3).
            run = await asyncio.to_thread(service.spool.read, first_head, 100_000)
            dropped_by_filter = sum(
                1 for r in run if r.type == CHANGE and orjson.loads(r.body)["data"]["kind"] != "D"
            )
            connector = aiohttp.UnixConnector(path=str(sock))
            async with aiohttp.ClientSession(connector=connector) as session:
                before = await scrape(session)
                await asyncio.to_thread(mounted.close)  # unmounted: the mount leaves
                await until_followed(service, 0)
                await service.sync()
                after = await scrape(session)
    old, new = monotonic_samples(before), monotonic_samples(after)
    assert old.keys() <= new.keys(), f"vanished: {sorted(old.keys() - new.keys())}"
    dropped = {k: (v, new[k]) for k, v in old.items() if new[k] < v}
    assert not dropped, f"counters decreased: {dropped}"

    resyncs = values(after, "layerwatch_resyncs_total")
    assert any(dict(labels)["mount"] == found for labels in resyncs), resyncs
    assert values(after, "layerwatch_build_info") == {(("version", version()),): 1}
    (durable,) = values(before, "layerwatch_durable_seconds_count").values()
    assert durable >= 3  # the restart's resync and snapshot, the change: each one waited
    assert dropped_by_filter >= 1
    assert values(before, "layerwatch_sink_filtered_total") == {
        (("sink", "audit"),): dropped_by_filter
    }
    (sends,) = values(before, "layerwatch_sink_send_seconds_count").values()
    assert sends >= 1
    assert values(before, "layerwatch_sink_retries_total") == {(("sink", "audit"),): 0}
    assert values(before, "layerwatch_sink_dead_lettered_total") == {(("sink", "audit"),): 0}
    (records,) = values(before, "layerwatch_spool_records").values()
    (size,) = values(before, "layerwatch_spool_bytes").values()
    assert records >= 3
    assert size > 0
    assert values(before, "layerwatch_mount_entries") == {(("mount", found),): 1}
    assert not values(after, "layerwatch_mount_entries")  # a gauge per mount: gone with it
