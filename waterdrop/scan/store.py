"""The scan's output folder: shard files written atomically, resume checks, progress and scan.json.

Layout::

    OUT/scan.json                    what was scanned, with which model, and the totals
    OUT/shards/shard-000012.parquet  the rows of inputs 12 * shard_size ... 13 * shard_size - 1

A shard is written to a hidden temporary name, flushed to disk and renamed: a shard file
that exists is complete, and is never rewritten. A re-run skips the shards that exist, so
a killed scan goes on where it stopped. The rows live in their own folder so that
``pandas.read_parquet("OUT/shards")`` (or DuckDB's ``'OUT/shards/*.parquet'``) reads
them without tripping over scan.json; readers skip the hidden temporary files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from waterdrop.scan.rows import printable
from waterdrop.scan.sources import Entry

#: Settings that must not change between a scan and its resumption (they decide what a shard holds).
SPEC_KEYS = ("model_sha256", "source", "shard_size", "embeddings", "since", "row_format")
#: 2: rows carry the file's size and modification time (``file_bytes``, ``mtime_ns``);
#: 3: and the content hash a manifest line gives (``content_hash``).
ROW_FORMAT = 3


class ScanError(RuntimeError):
    """A scan that cannot go on as asked (an output folder from another scan, lost rows)."""


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex): a scan's rows depend on the model's bytes, not on its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardStore:
    """Shard files and scan.json under ``out``.

    Args:
        out: the output folder (created).
        spec: ``model``, ``model_sha256``, ``source`` and ``shard_size`` of this scan. An
            existing scan.json with another ``SPEC_KEYS`` value is refused: its shards hold
            other rows.
        metadata: what the rows mean (``RowBuilder.metadata``), in scan.json from the start, so
            that the shards of a scan still running or killed can be read (indexed) already.
    """

    def __init__(self, out: str | Path, spec: dict, metadata: dict | None = None):
        self.out = Path(out)
        self.shards = self.out / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.record_path = self.out / "scan.json"
        if self.record_path.exists():
            before = json.loads(self.record_path.read_text())
            changed = [key for key in SPEC_KEYS if before.get(key) != spec[key]]
            if changed:
                raise ScanError(
                    f"{self.out} holds a scan with another {', '.join(changed)} "
                    f"({', '.join(f'{k}: {before.get(k)!r}' for k in changed)}); give a new --out"
                )
        for leftover in self.shards.glob(".tmp-*"):  # from a scan that was killed while writing
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        self.spec = spec
        self._write_record({**spec, "status": "running", **(metadata or {})})

    def shard_path(self, shard: int) -> Path:
        """Where shard number ``shard`` lives once finished."""
        return self.shards / f"shard-{shard:06d}.parquet"

    def temp_path(self, name: str) -> Path:
        """A hidden path in the shard folder, removed on the next start if left behind."""
        return self.shards / f".tmp-{name}"

    def is_done(self, shard: int, entries: list[Entry], listed: list[Entry] | None = None) -> bool:
        """Whether the shard exists; it must then hold exactly these paths, in this order. With
        ``listed`` (an incremental scan: the shard's entries in the source, ``entries`` those
        to score now) any of them in order will do: a file touched while the scan was stopped
        is left for the next scan rather than moving every later shard.

        Raises:
            ScanError: the source changed since the shard was written (its rows would no
                longer be the shard's inputs).
        """
        path = self.shard_path(shard)
        if not path.exists():
            return False
        written = pq.read_table(path, columns=["path"]).column("path").to_pylist()
        expected = [printable(entry.path) for entry in entries]
        if listed is not None and written != expected:
            remaining = iter(printable(entry.path) for entry in listed)
            if all(any(path == candidate for candidate in remaining) for path in written):
                return True
        if written != expected:
            raise ScanError(
                f"{path} does not hold the paths that SOURCE now gives for shard {shard} (the source "
                "changed since that scan); scan into a new --out"
            )
        return True

    def write(self, shard: int, table: pa.Table) -> None:
        """Write a finished shard atomically (temporary file, fsync, rename)."""
        final = self.shard_path(shard)
        if final.exists():
            raise ScanError(f"{final} exists; a finished shard is never rewritten")
        temp = self.temp_path(final.name)
        with open(temp, "wb") as stream:
            pq.write_table(table, stream, compression="zstd")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, final)

    def finish(self, run: dict, settings: dict, metadata: dict) -> dict:
        """Write scan.json with this run's figures and the counts over every shard; returns it."""
        rows = errors = count = 0
        for path in sorted(self.shards.glob("shard-*.parquet")):
            column = pq.read_table(path, columns=["error"]).column("error")
            rows, errors, count = rows + len(column), errors + len(column) - column.null_count, count + 1
        record = {
            **self.spec,
            "status": "finished",
            "settings": settings,
            "this_run": run,
            "all_shards": {"shards": count, "rows": rows, "scored": rows - errors, "errors": errors},
            **metadata,
        }
        self._write_record(record)
        return record

    def _write_record(self, record: dict) -> None:
        temp = self.out / ".scan.json.tmp"
        temp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(temp, self.record_path)


class Meter:
    """This run's counts, and a plain progress line on stderr every ``every`` seconds: images
    done of the source's total, images/s, time left, errors so far.

    A plain line rather than a bar: long scans run as batch jobs whose stderr goes to a log
    file, where a bar's carriage returns make one unreadable line (and tqdm is not a
    dependency of the runtime).

    Args:
        progress: print the line; the counts are kept either way.
        every: seconds between two lines.
        total: the source's inputs (a ``sources.Counter``, counting beside the scan), for the
            time left; None: no estimate.
        passed_over: how many inputs an incremental scan has skipped so far (a callable).
    """

    def __init__(self, progress: bool = True, every: float = 5.0, total=None, passed_over=None):
        self.start = self.last_time = time.perf_counter()
        self.progress, self.every = progress, every
        self.total, self.passed_over = total, passed_over or (lambda: 0)
        self.done = self.last_done = self.done_before = 0
        self.seen = self.errors = self.shards_written = self.shards_skipped = 0

    def add(self, table: pa.Table) -> None:
        """Count a written shard's rows."""
        errors = len(table) - table.column("error").null_count
        self.seen, self.errors = self.seen + len(table), self.errors + errors
        self.shards_written += 1

    def tick(self, images: int) -> None:
        """Images done since the last tick (a batch; shards are counted by ``add``)."""
        self.done += images
        now = time.perf_counter()
        if self.progress and now - self.last_time >= self.every:
            recent = (self.done - self.last_done) / (now - self.last_time)
            print(f"scan: {self._position()} in {now - self.start:.0f} s, {recent:.1f} img/s now, "
                  f"{self.done / (now - self.start):.1f} overall{self._left(recent)}; {self.errors:,} errors, "
                  f"{self.shards_written:,} shards written, {self.shards_skipped:,} done before",
                  file=sys.stderr, flush=True)
            self.last_time, self.last_done = now, self.done

    def _position(self) -> str:
        if self.total is None or not self.total.finished:
            counting = f" (counting the source: {self.total.count:,} so far)" if self.total is not None else ""
            return f"{self.done:,} images{counting}"
        total = self.total.count
        behind = self.done + self.done_before + self.passed_over()
        return f"{self.done:,} images, {behind:,} of {total:,} inputs ({100 * behind / max(total, 1):.0f} %)"

    def _left(self, rate: float) -> str:
        if self.total is None or not self.total.finished or rate <= 0:
            return ""
        remaining = max(0, self.total.count - self.done - self.done_before - self.passed_over()) / rate
        return f", about {remaining / 60:.0f} min left" if remaining >= 90 else f", about {remaining:.0f} s left"

    def skip(self, images: int = 0) -> None:
        """Count a shard (of ``images`` inputs) that an earlier run finished."""
        self.shards_skipped += 1
        self.done_before += images

    def close(self) -> dict:
        """This run's totals: seen, scored, errors, seconds, images/s, shards written and skipped."""
        seconds = time.perf_counter() - self.start
        return {
            "seen": self.seen,
            "scored": self.seen - self.errors,
            "errors": self.errors,
            "seconds": round(seconds, 2),
            "images_per_s": round(self.seen / seconds, 2) if seconds > 0 else 0.0,
            "shards_written": self.shards_written,
            "shards_skipped": self.shards_skipped,
        }


def scan_spec(model: str | Path, source: str | Path, shard_size: int, embeddings: str | None = None,
              since: list[str | Path] | None = None) -> dict:
    """What a scan's output depends on (see ``SPEC_KEYS``); ``embeddings``: the embedding
    column's value type, None without one; ``since``: the earlier scans it skips what they scored."""
    return {
        "model": os.path.abspath(model),
        "model_sha256": file_sha256(model),
        "source": os.path.abspath(source),
        "shard_size": shard_size,
        "embeddings": embeddings,
        "since": [os.path.abspath(scan) for scan in since] if since else None,
        "row_format": ROW_FORMAT,
    }
