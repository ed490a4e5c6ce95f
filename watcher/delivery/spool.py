"""The spool: the durable log every event is written to before any sink sees it.

One SQLite database in WAL mode with ``synchronous=FULL`` holds the events (``seq``, mount,
type, time of append, body), one cursor per consumer (sink), the persisted change list of each
mount, and a few meta values. SQLite is the only third-party-like dependency here, and this
module is its adapter: every ``sqlite3.Error`` leaves as ``SpoolError`` naming the file.

Decisions:

- **Group commit.** ``append`` writes one drain (its records and the change-list updates of the
  same drain) in one transaction, and returns only once it is durable. The SQLite work runs on
  one worker thread, so the event loop never waits for an ``fsync``. If the awaiting task is
  cancelled, the transaction still completes or fails as a whole; ``last_seq`` tells which.
- **Identity.** A spool gets an ``epoch`` when it is created (its creation time in ms, stored
  in ``meta``); event ids carry it, so a spool that replaces a lost one never reissues an id
  the old one used, although its sequence starts again at 1. A spool made by a version without
  epochs gets one the first time it is opened.
- **Sequence.** The caller assigns ``seq``; records must continue the sequence without holes
  (the first ever is 1). ``last_seq`` is stored apart from the events, so it survives pruning
  and restarts. ``read`` never returns a record beyond ``last_seq``, even one whose
  transaction has committed before ``last_seq`` moved, so a consumer never acknowledges a
  record the spool has not counted yet. Pruning drops a prefix only, so the retained records
  are always ``first_seq..last_seq`` with no holes (``first_seq == last_seq + 1`` when empty).
- **Cursors.** A cursor is the last ``seq`` a consumer acknowledged. A consumer not seen before
  starts at ``first_seq - 1``: it receives everything retained. ``cursor()`` registers it at
  that point, so a later prune that drops records it has not acknowledged names it.
  ``ack`` is durable when it returns and never moves a cursor backwards.
- **Retention.** ``prune(now)`` drops the oldest records while they are older than ``max_age``
  seconds (by time of append) or the bodies retained weigh more than ``max_bytes``. It never
  looks at cursors: retention wins over a stalled sink, and ``Pruned`` names the consumers that
  lost records, so the service can append an ``io.layerwatch.gap`` event. Freed pages are
  reused by later appends; the file does not shrink.
- **Change lists.** Paths are bytes and stored as BLOBs, so any name round-trips. A mount has a
  persisted list from the first ``append`` that carries ``lists[mount]`` (even an empty one)
  until ``drop_list``; ``mounts()`` tells a mount with an empty list from one never seen.
- **What changed since a position.** Each change record's path is indexed with the ``seq`` of
  the last event about it (``touched``), in the same transaction as the records and the list,
  and each mount's last ``resync``; so ``changes_since`` answers "which paths changed after
  seq N, and what are they now" with one indexed query, never a replay. Rows older than the
  retained records are pruned with them: a position older than ``first_seq - 1`` is
  ``PositionLost``. A spool made by schema 1 indexes from the seq after its upgrade on.
- **One owner.** A spool file belongs to one ``Spool`` at a time: an exclusive ``flock`` on
  the database file itself (not on a name next to it), so a second opener gets ``SpoolError``
  whatever name it uses, a symlink or a hard link included. ``read`` and the other queries use their
  own connection, so they never wait for an ``append``; ``ack``, ``set_meta``, ``drop_list`` and
  ``prune`` are short transactions that may wait for one ``append`` to finish. ``prune`` can
  take long when much expires: from a loop, call it through ``asyncio.to_thread``.
- **Failures.** A full disk or I/O error during ``append`` rolls the whole transaction back and
  raises ``SpoolError``; what was appended before stays readable, and the spool stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, Self

import structlog

from watcher.core.errors import SpoolError
from watcher.core.model import Kind
from watcher.delivery.events import RESYNC, Record

__all__ = ["PositionLost", "Pruned", "Since", "Spool", "SpoolStats"]

logger = structlog.get_logger("layerwatch.spool")

_APPLICATION_ID: Final = 0x4C575350  # "LWSP": tells a spool from any other SQLite file
_SCHEMA_VERSION: Final = 2
_TOUCHED: Final = """
CREATE TABLE touched (
    mount TEXT NOT NULL,
    path  BLOB NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (mount, path)
) WITHOUT ROWID;
CREATE INDEX touched_by_seq ON touched (seq);
"""
_SCHEMA: Final = f"""
BEGIN IMMEDIATE;
CREATE TABLE events (
    seq   INTEGER PRIMARY KEY,
    mount TEXT NOT NULL,
    type  TEXT NOT NULL,
    at    REAL NOT NULL,
    body  BLOB NOT NULL
);
CREATE TABLE head (
    id       INTEGER PRIMARY KEY CHECK (id = 0),
    last_seq INTEGER NOT NULL,
    bytes    INTEGER NOT NULL
);
INSERT INTO head VALUES (0, 0, 0);
CREATE TABLE cursors (consumer TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE list_mounts (mount TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE lists (
    mount TEXT NOT NULL,
    path  BLOB NOT NULL,
    kind  TEXT NOT NULL CHECK (kind IN ('A', 'C', 'D')),
    PRIMARY KEY (mount, path)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
{_TOUCHED}
PRAGMA application_id = {_APPLICATION_ID};
PRAGMA user_version = {_SCHEMA_VERSION};
COMMIT;
"""

_UPGRADE_FROM_1: Final = f"""
BEGIN IMMEDIATE;
{_TOUCHED}
INSERT INTO meta SELECT 'touched_from', last_seq + 1 FROM head;
PRAGMA user_version = {_SCHEMA_VERSION};
COMMIT;
"""

_NO_LISTS: Final[Mapping[str, Mapping[bytes, Kind | None]]] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Pruned:
    """What ``Spool.prune`` dropped that some consumer had not acknowledged.

    Attributes:
        first_dropped: the oldest ``seq`` dropped.
        last_dropped: the newest ``seq`` dropped.
        consumers_behind: the consumers whose cursor was below ``last_dropped``, sorted.
    """

    first_dropped: int
    last_dropped: int
    consumers_behind: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Since:
    """What changed in one mount after a position: ``Spool.changes_since``'s answer.

    Attributes:
        since: the position asked about.
        head: the ``seq`` the answer is consistent with (the spool's ``last_seq`` then).
        resync: a ``resync`` of the mount came after ``since``: what changed in between is not
            known path by path (an overflow, a restart), so ``paths`` also holds every entry of
            the list; take it as a fresh list.
        paths: sorted by path: (path, its kind now or None when it is no longer in the list,
            the ``seq`` of the last event about it, or of the resync for an entry only the
            resync accounts for).
    """

    since: int
    head: int
    resync: bool
    paths: list[tuple[bytes, Kind | None, int]]


class PositionLost(LookupError):
    """A position older than what the spool keeps (or from another spool).

    Attributes:
        oldest: the oldest position the spool can answer for now.
    """

    def __init__(self, message: str, oldest: int) -> None:
        super().__init__(message)
        self.oldest = oldest


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolStats:
    """A snapshot of the spool for metrics and ``/healthz``.

    Attributes:
        records: how many records are retained.
        bytes: the size of their bodies.
        first_seq: the oldest retained ``seq`` (``last_seq + 1`` when empty).
        last_seq: the newest ``seq`` ever appended (0 when none).
        cursors: every known consumer's cursor.
    """

    records: int
    bytes: int
    first_seq: int
    last_seq: int
    cursors: dict[str, int]


class Spool:
    """The durable event log, with per-consumer cursors and the persisted change lists.

    Args:
        path: the database file; its directory is created if missing.
        max_bytes: retention by size: the bodies ``prune`` keeps weigh at most this.
        max_age: retention by age: ``prune`` drops records appended longer ago (seconds).

    Raises:
        SpoolError: the file cannot be opened for writing (read-only directory or file, full
            disk), is not a spool or is corrupt, or is in use by another ``Spool``.
    """

    def __init__(self, path: Path, *, max_bytes: int = 1 << 30, max_age: float = 7 * 86400) -> None:
        if max_bytes < 0 or max_age < 0:
            raise ValueError("max_bytes and max_age must not be negative")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._logger = logger.bind(spool=str(self._path))
        self._write_lock = threading.Lock()  # guards the writer connection and the counters
        self._read_lock = threading.Lock()
        self._waiters: set[asyncio.Future[None]] = set()
        self._waiters_lock = threading.Lock()
        self._closed = False
        self._lock_fd = self._lock()
        try:
            self._writer = self._connect()
            self._init_schema()
            self._reader = self._connect()
            with self._errors("open"):
                self._reader.execute("PRAGMA query_only = ON")
                last_seq, nbytes = self._writer.execute(
                    "SELECT last_seq, bytes FROM head"
                ).fetchone()
                first = self._writer.execute("SELECT min(seq) FROM events").fetchone()[0]
        except BaseException:
            self._close_all()
            raise
        self._epoch = self._load_epoch()
        self._last_seq: int = last_seq
        self._bytes: int = nbytes
        self._first_seq: int = last_seq + 1 if first is None else first
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._logger.info(
            "spool_opened", epoch=self._epoch, first_seq=self._first_seq, last_seq=self._last_seq
        )

    # -- opening -----------------------------------------------------------------------------

    def _fail(self, problem: str) -> SpoolError:
        return SpoolError(f"spool {self._path}: {problem}")

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate ``sqlite3.Error`` into ``SpoolError`` naming the file and the action."""
        try:
            yield
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", None)
            detail = f"{exc} ({name})" if name else str(exc)
            raise self._fail(f"{action} failed: {detail}") from exc

    def _lock(self) -> int:
        """Open (creating if needed) and ``flock`` the database file itself.

        The lock belongs to the file, not to the name: a symlink or hard link to a spool in
        use is refused like the same path. An empty new file is an empty SQLite database.
        """
        directory = self._path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._fail(f"cannot create directory {directory}: {exc.strerror}") from exc
        if not os.access(directory, os.W_OK):  # SQLite writes its WAL beside the file
            raise self._fail(f"directory {directory} is not writable")
        if self._path.exists() and not os.access(self._path, os.W_OK):
            raise self._fail("file is not writable")
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._fail(f"cannot open: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise self._fail("in use by another process (or another Spool)") from exc
        return fd

    def _connect(self) -> sqlite3.Connection:
        with self._errors("open"):
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA busy_timeout = 10000")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise self._fail(f"cannot use WAL mode (journal_mode is {mode})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA journal_size_limit = 67108864")
            except BaseException:
                conn.close()
                raise
        return conn

    def _init_schema(self) -> None:
        conn = self._writer
        with self._errors("open"):
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
            if app_id == 0 and tables == 0:
                try:
                    conn.executescript(_SCHEMA)
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return
        if app_id != _APPLICATION_ID:
            raise self._fail("not a layerwatch spool (another SQLite database)")
        if version == 1:
            with self._errors("upgrade"):
                try:
                    conn.executescript(_UPGRADE_FROM_1)
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            self._logger.info("spool_upgraded", schema=_SCHEMA_VERSION)
            return
        if version != _SCHEMA_VERSION:
            raise self._fail(f"schema version {version} is not supported ({_SCHEMA_VERSION} is)")

    def _load_epoch(self) -> int:
        """The spool's identity, made (and stored) the first time it is needed."""
        with self._errors("open"):
            row = self._writer.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is not None:
                return int(row[0])
            epoch = time.time_ns() // 1_000_000
            self._writer.execute("INSERT INTO meta VALUES ('epoch', ?)", (str(epoch),))
            return epoch

    # -- plumbing ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise self._fail("closed")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection; call with ``_write_lock`` held."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # After SQLITE_FULL or an I/O error SQLite may have rolled back already.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _notify(self) -> None:
        """Wake every ``wait`` (from any thread): ``last_seq`` moved or the spool closed."""
        with self._waiters_lock:
            waiters = list(self._waiters)
        for fut in waiters:
            fut.get_loop().call_soon_threadsafe(_resolve, fut)

    # -- the log -----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def epoch(self) -> int:
        """The spool's identity: its creation time in ms, fixed for the life of the file."""
        return self._epoch

    @property
    def last_seq(self) -> int:
        """The newest ``seq`` ever appended; 0 when nothing was; survives pruning."""
        return self._last_seq

    @property
    def first_seq(self) -> int:
        """The oldest retained ``seq``; ``last_seq + 1`` when nothing is retained."""
        return self._first_seq

    async def append(
        self,
        records: Sequence[Record],
        *,
        lists: Mapping[str, Mapping[bytes, Kind | None]] = _NO_LISTS,
    ) -> None:
        """Append one drain's records and change-list updates in one durable transaction.

        Args:
            records: the events, continuing the sequence (``last_seq + 1``, ``+ 2``, ...).
            lists: per mount, the change-list updates of the same drain: path -> new kind,
                None to remove the path.

        Raises:
            ValueError: the records do not continue the sequence.
            SpoolError: the disk is full or an I/O error occurred; nothing of this call was
                written, and the spool stays usable for reads.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._append, records, lists)

    def _append(
        self, records: Sequence[Record], lists: Mapping[str, Mapping[bytes, Kind | None]]
    ) -> None:
        with self._write_lock:
            self._check_open()
            for offset, record in enumerate(records, start=self._last_seq + 1):
                if record.seq != offset:
                    raise ValueError(
                        f"record seq {record.seq} does not continue the spool (expected {offset})"
                    )
            if not records and not lists:
                return
            now = time.time()
            nbytes = sum(len(r.body) for r in records)
            touched: dict[tuple[str, bytes], int] = {}
            resyncs: dict[str, int] = {}
            for r in records:
                if r.path is not None:
                    touched[(r.mount, r.path)] = r.seq
                elif r.type == RESYNC:
                    resyncs[r.mount] = r.seq
            try:
                with self._errors("append"), self._transaction() as conn:
                    conn.executemany(
                        "INSERT INTO events (seq, mount, type, at, body) VALUES (?, ?, ?, ?, ?)",
                        [(r.seq, r.mount, r.type, now, r.body) for r in records],
                    )
                    for mount, updates in lists.items():
                        _write_list(conn, mount, updates)
                    conn.executemany(
                        "INSERT INTO touched VALUES (?, ?, ?) "
                        "ON CONFLICT (mount, path) DO UPDATE SET seq = excluded.seq",
                        [(mount, path, seq) for (mount, path), seq in touched.items()],
                    )
                    conn.executemany(
                        "INSERT INTO meta VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        [(_resync_key(mount), str(seq)) for mount, seq in resyncs.items()],
                    )
                    if records:
                        conn.execute(
                            "UPDATE head SET last_seq = ?, bytes = bytes + ?",
                            (records[-1].seq, nbytes),
                        )
            except SpoolError as exc:
                self._logger.error("spool_append_failed", records=len(records), error=str(exc))
                raise
            if records:
                self._bytes += nbytes
                self._last_seq = records[-1].seq
        if records:
            self._notify()

    def read(self, after: int, limit: int) -> list[Record]:
        """The retained records with ``seq > after``, ascending, at most ``limit`` of them."""
        self._check_open()
        if limit <= 0:
            return []
        last = self._last_seq  # committed rows past it are not counted yet: not readable
        with self._read_lock, self._errors("read"):
            rows = self._reader.execute(
                "SELECT seq, mount, type, body FROM events WHERE seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?",
                (after, last, limit),
            ).fetchall()
        return [Record(seq, mount, type_, body, self._epoch) for seq, mount, type_, body in rows]

    async def wait(self, after: int) -> None:
        """Return as soon as ``last_seq > after``; cancellable.

        Raises:
            SpoolError: the spool was closed while waiting.
        """
        while True:
            self._check_open()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            with self._waiters_lock:
                self._waiters.add(fut)
            try:
                # Checked after registering, so an append in between cannot be missed.
                if self._last_seq > after:
                    return
                await fut
            finally:
                with self._waiters_lock:
                    self._waiters.discard(fut)

    # -- cursors -----------------------------------------------------------------------------

    def cursor(self, consumer: str) -> int:
        """The last ``seq`` ``consumer`` acknowledged.

        A new consumer is registered at ``first_seq - 1`` (it receives everything retained).
        """
        self._check_open()
        with self._read_lock, self._errors("cursor"):
            row = self._reader.execute(
                "SELECT seq FROM cursors WHERE consumer = ?", (consumer,)
            ).fetchone()
        if row is not None:
            return int(row[0])
        with self._write_lock, self._errors("cursor"), self._transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO cursors VALUES (?, ?)", (consumer, self._first_seq - 1)
            )
            return int(
                conn.execute("SELECT seq FROM cursors WHERE consumer = ?", (consumer,)).fetchone()[
                    0
                ]
            )

    def ack(self, consumer: str, seq: int) -> None:
        """Durably record that ``consumer`` has everything up to ``seq``; never moves back.

        Raises:
            ValueError: ``seq`` is beyond ``last_seq``.
        """
        self._check_open()
        if seq > self._last_seq:
            raise ValueError(f"ack of seq {seq} beyond last_seq {self._last_seq}")
        with self._write_lock, self._errors("ack"), self._transaction() as conn:
            conn.execute(
                "INSERT INTO cursors VALUES (?, ?) ON CONFLICT (consumer) "
                "DO UPDATE SET seq = max(cursors.seq, excluded.seq)",
                (consumer, seq),
            )

    # -- change lists and meta ---------------------------------------------------------------

    def load_list(self, mount: str) -> dict[bytes, Kind]:
        """The persisted change list of ``mount`` (empty when it has none)."""
        self._check_open()
        with self._read_lock, self._errors("load_list"):
            rows = self._reader.execute(
                "SELECT path, kind FROM lists WHERE mount = ?", (mount,)
            ).fetchall()
        return {bytes(path): Kind(kind) for path, kind in rows}

    def mounts(self) -> list[str]:
        """The mounts that have a persisted change list (possibly empty), sorted."""
        self._check_open()
        with self._read_lock, self._errors("mounts"):
            rows = self._reader.execute("SELECT mount FROM list_mounts ORDER BY mount").fetchall()
        return [mount for (mount,) in rows]

    def drop_list(self, mount: str) -> None:
        """Forget the persisted change list of ``mount``."""
        self._check_open()
        with self._write_lock, self._errors("drop_list"), self._transaction() as conn:
            conn.execute("DELETE FROM lists WHERE mount = ?", (mount,))
            conn.execute("DELETE FROM list_mounts WHERE mount = ?", (mount,))
            conn.execute("DELETE FROM touched WHERE mount = ?", (mount,))
            conn.execute("DELETE FROM meta WHERE key = ?", (_resync_key(mount),))

    def changes_since(self, mount: str, since: int) -> Since:
        """Which paths of ``mount`` changed after ``since``, and what they are now; one
        consistent read, however many events came after ``since``.

        Raises:
            PositionLost: ``since`` is older than the retained records (or than the index,
                for a spool upgraded from schema 1), or ahead of ``last_seq`` (another spool's
                position).
        """
        self._check_open()
        with self._read_lock, self._errors("changes_since"):
            conn = self._reader
            conn.execute("BEGIN")
            try:
                head = int(conn.execute("SELECT last_seq FROM head").fetchone()[0])
                first = conn.execute("SELECT min(seq) FROM events").fetchone()[0]
                oldest = head if first is None else int(first) - 1
                meta = dict(
                    conn.execute(
                        "SELECT key, value FROM meta WHERE key IN ('touched_from', ?)",
                        (_resync_key(mount),),
                    ).fetchall()
                )
                oldest = max(oldest, int(meta.get("touched_from", 1)) - 1)
                if since < oldest or since > head:
                    where = "older than the spool keeps" if since < oldest else "ahead of its head"
                    raise PositionLost(
                        f"position {since} is {where} (the spool answers from {oldest} to "
                        f"{head}): read the whole list and continue from its seq",
                        oldest,
                    )
                resync_seq = int(meta.get(_resync_key(mount), 0))
                rows = conn.execute(
                    "SELECT t.path, l.kind, t.seq FROM touched t LEFT JOIN lists l "
                    "ON l.mount = t.mount AND l.path = t.path WHERE t.mount = ? AND t.seq > ?",
                    (mount, since),
                ).fetchall()
                paths = {bytes(p): (None if k is None else Kind(k), int(q)) for p, k, q in rows}
                resync = resync_seq > since
                if resync:
                    for path, kind in conn.execute(
                        "SELECT path, kind FROM lists WHERE mount = ?", (mount,)
                    ):
                        paths.setdefault(bytes(path), (Kind(kind), resync_seq))
            finally:
                conn.execute("COMMIT")
        ordered = [(path, kind, seq) for path, (kind, seq) in sorted(paths.items())]
        return Since(since=since, head=head, resync=resync, paths=ordered)

    def get_meta(self, key: str) -> str | None:
        """The meta value stored under ``key``, or None."""
        self._check_open()
        with self._read_lock, self._errors("get_meta"):
            row = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Durably store ``value`` under ``key``."""
        self._check_open()
        with self._write_lock, self._errors("set_meta"), self._transaction() as conn:
            conn.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- retention ---------------------------------------------------------------------------

    def prune(self, now: float) -> Pruned | None:
        """Drop the oldest records beyond ``max_age`` (before ``now``) or ``max_bytes``.

        Returns:
            ``Pruned`` when a dropped record had not been acknowledged by some consumer (the
            caller then appends a gap event); None when nothing was dropped or nobody missed it.
        """
        self._check_open()
        cutoff = now - self._max_age
        with self._write_lock, self._errors("prune"), self._transaction() as conn:
            excess = self._bytes - self._max_bytes
            last_dropped: int | None = None
            dropped_bytes = 0
            rows = conn.execute("SELECT seq, at, length(body) FROM events ORDER BY seq")
            try:
                for seq, at, size in rows:
                    if at >= cutoff and dropped_bytes >= excess:
                        break
                    last_dropped = seq
                    dropped_bytes += size
            finally:
                rows.close()
            if last_dropped is None:
                return None
            first_dropped = self._first_seq
            conn.execute("DELETE FROM events WHERE seq <= ?", (last_dropped,))
            conn.execute("DELETE FROM touched WHERE seq <= ?", (last_dropped,))
            conn.execute("UPDATE head SET bytes = bytes - ?", (dropped_bytes,))
            behind = [
                consumer
                for (consumer,) in conn.execute(
                    "SELECT consumer FROM cursors WHERE seq < ? ORDER BY consumer", (last_dropped,)
                )
            ]
        # Committed (the transaction block above raised otherwise).
        self._first_seq = last_dropped + 1
        self._bytes -= dropped_bytes
        self._logger.info(
            "spool_pruned",
            first_dropped=first_dropped,
            last_dropped=last_dropped,
            bytes=dropped_bytes,
            consumers_behind=behind,
        )
        if not behind:
            return None
        return Pruned(
            first_dropped=first_dropped, last_dropped=last_dropped, consumers_behind=behind
        )

    def stats(self) -> SpoolStats:
        """Counts and cursors, for metrics."""
        self._check_open()
        with self._read_lock, self._errors("stats"):
            rows = self._reader.execute("SELECT consumer, seq FROM cursors").fetchall()
        return SpoolStats(
            records=self._last_seq - self._first_seq + 1,
            bytes=self._bytes,
            first_seq=self._first_seq,
            last_seq=self._last_seq,
            cursors={consumer: int(seq) for consumer, seq in rows},
        )

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for an append in flight, then close the database; idempotent.

        Any ``wait`` in progress raises ``SpoolError``.
        """
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True)
        self._close_all()
        self._notify()
        self._logger.info("spool_closed", last_seq=self._last_seq)

    def _close_all(self) -> None:
        # The reader first: the last connection to close checkpoints the WAL.
        for name in ("_reader", "_writer"):
            conn: sqlite3.Connection | None = getattr(self, name, None)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _write_list(conn: sqlite3.Connection, mount: str, updates: Mapping[bytes, Kind | None]) -> None:
    conn.execute("INSERT OR IGNORE INTO list_mounts VALUES (?)", (mount,))
    conn.executemany(
        "DELETE FROM lists WHERE mount = ? AND path = ?",
        [(mount, path) for path, kind in updates.items() if kind is None],
    )
    conn.executemany(
        "INSERT INTO lists VALUES (?, ?, ?) ON CONFLICT (mount, path) "
        "DO UPDATE SET kind = excluded.kind",
        [(mount, path, kind.value) for path, kind in updates.items() if kind is not None],
    )


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _resync_key(mount: str) -> str:
    """The meta key of ``mount``'s last resync seq."""
    return f"resync:{mount}"
