"""Incremental scans: score only what earlier scans of the same model have not scored.

A pool grows every day. ``Previous`` reads earlier scan folders of the same model (the model
file's SHA-256, and the same embedding column: another model's scans are refused, so two
models' scores never mix) and keeps, per path, the state its newest row recorded: the content
hash its manifest line gave, else the file's size and modification time, or "removed" where a
later scan listed it in ``removed.parquet``.
Scans count as newer by their scan.json's modification time (it is written when a scan
finishes). A scan given them (``--since``) skips a file whose state is what its path's newest
row recorded, scores the rest (new files, changed files, files put back),
and lists in ``removed.parquet`` the paths they hold that the source no longer has. An earlier
error row of an unchanged file stands (the same file fails again) unless ``retry_errors``. For
each path the newest scan's row holds: the scans together cover the pool.

Paths and states are kept as 64-bit hashes in numpy arrays: about 24 bytes a row of the
earlier scans while they are read, 16 bytes a path after, and 8 bytes a file of the source.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from waterdrop.scan.rows import printable
from waterdrop.scan.sources import Entry, source_entries, with_file_state
from waterdrop.scan.store import Meter, ScanError, ShardStore

STATE_COLUMNS = ["path", "error", "file_bytes", "mtime_ns"]
HASH_COLUMN = "content_hash"  # rows of older scans have none (a hashed line then never matches: scored once)
#: States that no file has: a path a later scan found gone, an error to score again.
REMOVED, RETRY = np.uint64(0), np.uint64(1)


def _key(*parts) -> int:
    """A 64-bit hash of the parts (a path, or a path with its size and modification time)."""
    text = "\0".join(map(str, parts)).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _state(path: str, size: int | None, mtime_ns: int | None, content_hash: str | None) -> int:
    """A file's state: its content hash where the source gave one, else its size and time."""
    return _key(path, "content", content_hash) if content_hash is not None else _key(path, size, mtime_ns)


def _keys(paths: Iterable[str]) -> np.ndarray:
    return np.fromiter((_key(path) for path in paths), np.uint64)


class Previous:
    """The newest state of every path of earlier scans of one model.

    Raises:
        ScanError: a folder that is not a scan, one of another model or embedding column, or one
            written before scans recorded file sizes and times (it cannot tell a changed file).
    """

    def __init__(self, scans: list[str | Path], model_sha256: str, embeddings: str | None = None,
                 retry_errors: bool = False):
        records = []
        for scan in map(Path, scans):
            record_path = scan / "scan.json"
            if not record_path.is_file():
                raise ScanError(f"--since {scan}: no scan.json; give a folder written by tools/scan.py")
            record = json.loads(record_path.read_text())
            if record.get("model_sha256") != model_sha256:
                raise ScanError(f"--since {scan} was scanned with another model (sha256 "
                                f"{str(record.get('model_sha256'))[:12]}); its scores would mix with this model's: "
                                "give scans of this model only, or scan the pool whole")
            if record.get("embeddings") != embeddings:
                raise ScanError(f"--since {scan} has embeddings {record.get('embeddings')!r}, this scan "
                                f"{embeddings!r}: the files it spares would lack this scan's columns")
            records.append((record_path.stat().st_mtime_ns, str(scan), scan))
        self.scans = [scan for _, _, scan in sorted(records)]  # oldest first
        paths, states, order = [], [], []
        for number, scan in enumerate(self.scans):
            for shard in sorted((scan / "shards").glob("shard-*.parquet")):
                if not set(STATE_COLUMNS) <= set(pq.read_schema(shard).names):
                    raise ScanError(f"--since {scan}: written before scans recorded file sizes and times, so a "
                                    "changed file cannot be told; scan the pool whole once")
                hashed = HASH_COLUMN in pq.read_schema(shard).names
                table = pq.read_table(shard, columns=STATE_COLUMNS + [HASH_COLUMN] * hashed).to_pydict()
                table.setdefault(HASH_COLUMN, [None] * len(table["path"]))
                rows = list(zip(*(table[c] for c in [*STATE_COLUMNS, HASH_COLUMN])))
                paths.append(_keys(path for path, *_ in rows))
                # A hashed line's error row is tried again at every scan: its file was not looked
                # at when listed, so the error may be a file missing then; a file that fails as it
                # is costs a decode each time.
                unknown = [(size is None and content is None) or (error is not None and (retry_errors or content))
                           for _, error, size, _, content in rows]
                states.append(np.array([RETRY if again else _state(path, size, mtime, content)
                                        for again, (path, _, size, mtime, content) in zip(unknown, rows)], np.uint64))
                order.append(np.full(len(rows), number, np.int32))
            removed = scan / "removed.parquet"
            if removed.is_file():
                gone = pq.read_table(removed).column("path").to_pylist()
                paths.append(_keys(gone))
                states.append(np.full(len(gone), REMOVED, np.uint64))
                order.append(np.full(len(gone), number, np.int32))
        paths = np.concatenate(paths) if paths else np.zeros(0, np.uint64)
        states = np.concatenate(states) if states else np.zeros(0, np.uint64)
        order = np.concatenate(order) if order else np.zeros(0, np.int32)
        # The newest row of every path: sorted by path then scan, the last of each run of a path.
        ranked = np.lexsort((order, paths))
        paths, states = paths[ranked], states[ranked]
        last = np.r_[paths[1:] != paths[:-1], True] if len(paths) else np.zeros(0, bool)
        self.paths, self.states = paths[last], states[last]
        self.skipped = 0
        self._current: list[np.ndarray] = []
        self._pending: list[int] = []

    def is_current(self, entry: Entry) -> bool:
        """Whether the file is as its path's newest row recorded it (and that row stands)."""
        path = printable(entry.path)
        key = np.uint64(_key(path))
        self._note(key)
        if entry.problem is not None or (entry.size is None and entry.content_hash is None):
            return False
        at = np.searchsorted(self.paths, key)
        if at == len(self.paths) or self.paths[at] != key:
            return False
        state = self.states[at]
        now = np.uint64(_state(path, entry.size, entry.mtime_ns, entry.content_hash))
        if state in (REMOVED, RETRY) or state != now:
            return False
        self.skipped += 1
        return True

    def _note(self, key: np.uint64) -> None:
        """Remember a path of the source (for ``removed``), in arrays of 65,536."""
        self._pending.append(key)
        if len(self._pending) >= 65_536:
            self._current.append(np.array(self._pending, np.uint64))
            self._pending = []

    def removed(self) -> list[str]:
        """Paths the earlier scans hold (not removed) that the source, as read through
        ``is_current``, lacks."""
        current = np.concatenate([*self._current, np.array(self._pending, np.uint64)])
        held = self.paths[self.states != REMOVED]
        gone = np.setdiff1d(held, current)
        found: set[str] = set()
        for scan in self.scans:
            for shard in sorted((scan / "shards").glob("shard-*.parquet")):
                paths = pq.read_table(shard, columns=["path"]).column("path").to_pylist()
                found.update(path for path, hit in zip(paths, np.isin(_keys(paths), gone)) if hit)
        return sorted(found)


def with_since(run: dict, previous: Previous | None, out: Path) -> dict:
    """A run's figures with what the earlier scans spared it and how many files are gone since
    them (listed in OUT/removed.parquet); ``run`` as it is without earlier scans."""
    if previous is None:
        return run
    removed = previous.removed()
    pq.write_table(pa.table({"path": pa.array(removed, pa.string())}), Path(out) / "removed.parquet")
    return {**run, "skipped_as_scored_before": previous.skipped, "removed_since": len(removed)}


def shards_to_score(entries: Iterable[Entry], shard_size: int,
                    previous: Previous | None = None) -> Iterator[tuple[int, list[Entry], list[Entry]]]:
    """(shard, its entries in the source, those to score) for consecutive runs of ``shard_size``
    source entries, each entry with its source position as ``index``. Shards are cut by position
    in the source, before ``previous`` spares what it has scored, so a file touched while a scan
    was stopped moves no other file to another shard: the scan resumes."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, not {shard_size}")
    chunk: list[Entry] = []
    shard = 0
    for position, entry in enumerate(entries):
        chunk.append(entry._replace(index=position))
        if len(chunk) == shard_size:
            yield shard, chunk, [e for e in chunk if previous is None or not previous.is_current(e)]
            chunk, shard = [], shard + 1
    if chunk:
        yield shard, chunk, [e for e in chunk if previous is None or not previous.is_current(e)]


def shards_left(source: str | Path, shard_size: int, previous: Previous | None, store: ShardStore, meter: Meter,
                empty: pa.Table) -> Iterator[tuple[int, list[Entry]]]:
    """(shard, entries to score) of every shard this run scores. A shard an earlier run finished
    is counted and passed over; one with nothing to score (all spared) is written ``empty``, so
    that it counts as finished."""
    listed = with_file_state(source_entries(source))
    for shard, in_source, entries in shards_to_score(listed, shard_size, previous):
        if store.is_done(shard, entries, in_source if previous else None):
            meter.skip(len(entries))
        elif not entries:
            store.write(shard, empty)
            meter.add(empty)
        else:
            yield shard, entries
