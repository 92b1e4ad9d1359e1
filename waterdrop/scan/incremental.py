"""Incremental scans: score only what earlier scans of the same model have not scored.

A pool grows every day. ``Previous`` reads earlier scan folders of the same model (the model
file's SHA-256: another model's scans are refused, so two models' scores never mix) and keeps,
as sorted 64-bit hashes, every scored file's (path, size, modification time) and every path
they listed. A scan given them (``--since``) skips a file whose path, size and modification
time match a scored row, scores the rest (new files, changed files, files whose earlier row was
an error), and lists in ``removed.parquet`` the paths the earlier scans listed that the source
no longer has. For each path the newest scan's row holds: the scans together cover the pool.
Memory: 8 bytes a row of the earlier scans, twice, and 8 bytes a file of the source.
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
from waterdrop.scan.sources import Entry
from waterdrop.scan.store import ScanError

STATE_COLUMNS = ["path", "error", "file_bytes", "mtime_ns"]


def _key(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8", "surrogateescape"),
                                          digest_size=8).digest(), "little")


class Previous:
    """What earlier scans of one model scored.

    Raises:
        ScanError: a folder that is not a scan, one of another model, or one written before
            scans recorded file sizes and times (it cannot tell a changed file).
    """

    def __init__(self, scans: list[str | Path], model_sha256: str):
        self.scans = [Path(scan) for scan in scans]
        scored, listed = [], []
        for scan in self.scans:
            record_path = scan / "scan.json"
            if not record_path.is_file():
                raise ScanError(f"--since {scan}: no scan.json; give a folder written by tools/scan.py")
            record = json.loads(record_path.read_text())
            if record.get("model_sha256") != model_sha256:
                raise ScanError(f"--since {scan} was scanned with another model (sha256 "
                                f"{str(record.get('model_sha256'))[:12]}); its scores would mix with this model's: "
                                "give scans of this model only, or scan the pool whole")
            for shard in sorted((scan / "shards").glob("shard-*.parquet")):
                names = pq.read_schema(shard).names
                if not set(STATE_COLUMNS) <= set(names):
                    raise ScanError(f"--since {scan}: written before scans recorded file sizes and times, so a "
                                    "changed file cannot be told; scan the pool whole once")
                table = pq.read_table(shard, columns=STATE_COLUMNS).to_pydict()
                for path, error, size, mtime in zip(*(table[c] for c in STATE_COLUMNS)):
                    listed.append(_key(path))
                    if error is None and size is not None:
                        scored.append(_key(path, size, mtime))
        self.scored = np.unique(np.array(scored, np.uint64))
        self.listed = np.unique(np.array(listed, np.uint64))
        self.skipped = 0
        self._current: list[int] = []

    def new_entries(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        """The entries (with their file state, ``with_file_state``) not scored before as they are now."""
        for entry in entries:
            self._current.append(_key(printable(entry.path)))
            if entry.problem is None and entry.size is not None:
                key = np.uint64(_key(printable(entry.path), entry.size, entry.mtime_ns))
                at = np.searchsorted(self.scored, key)
                if at < len(self.scored) and self.scored[at] == key:
                    self.skipped += 1
                    continue
            yield entry

    def removed(self) -> list[str]:
        """Paths the earlier scans listed that the source (read through ``new_entries``) lacks."""
        gone = np.setdiff1d(self.listed, np.array(self._current, np.uint64), assume_unique=False)
        paths = set()
        for scan in self.scans:
            for shard in sorted((scan / "shards").glob("shard-*.parquet")):
                for path in pq.read_table(shard, columns=["path"]).column("path").to_pylist():
                    key = np.uint64(_key(path))
                    at = np.searchsorted(gone, key)
                    if at < len(gone) and gone[at] == key:
                        paths.add(path)
        return sorted(paths)


def with_since(run: dict, previous: Previous | None, out: Path) -> dict:
    """A run's figures with what the earlier scans spared it and how many files are gone since
    them (listed in OUT/removed.parquet); ``run`` as it is without earlier scans."""
    if previous is None:
        return run
    removed = previous.removed()
    pq.write_table(pa.table({"path": pa.array(removed, pa.string())}), Path(out) / "removed.parquet")
    return {**run, "skipped_as_scored_before": previous.skipped, "removed_since": len(removed)}
