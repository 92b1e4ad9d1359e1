"""The local engine: decode in worker processes, one onnxruntime session in this process.

Worker processes read, decode and resize batches of paths (``decode_for_model``: the
runtime's own preprocessing) and send back uint8 images at the model's size, a third of
the bytes of the float32 tensor. At most ``2 * workers + 2`` batches are in flight, so
memory stays bounded however large the pool; batches come back in submission order, so a
shard's rows are in input order. The main process stacks each batch, runs the session
and writes a shard when its last batch is scored.

The onnxruntime session gets ``threads`` intra-op threads, set explicitly (onnxruntime
sizes its pool from the machine's cores, not from cgroup limits), and its threads do not
spin while waiting: here they share the cores with the decoders, and spinning threads
would take CPU time from them. Workers are started with ``spawn``: forking a process that
already runs onnxruntime's and OpenCV's thread pools is unsafe.

A file that kills its decoding process (a decoder crash, the out-of-memory killer) does not
stop the scan: every batch in flight fails with the pool, later batches go to a new pool, and
each failed batch is decoded again in a process of its own, halved until the file is found;
it gets an error row, as an undecodable file does, and a rerun finds its shard finished.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from waterdrop.runtime import Predictor
from waterdrop.scan.incremental import Previous, shards_left, with_since
from waterdrop.scan.rows import Decoded, RowBuilder, decode_for_model
from waterdrop.scan.sources import Counter, Entry
from waterdrop.scan.store import Meter, ShardStore, scan_spec

#: How far below the scanning process the decoding processes run (``os.nice``).
DECODER_NICENESS = 19
#: Session config entries for a session that shares its cores with decoding processes.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def available_cpus() -> int:
    """CPUs this process may run on (affinity, e.g. ``taskset`` or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own pool would oversubscribe
    # Below the session's threads: onnxruntime's threads meet at a barrier after every operator,
    # so a decoder that preempts one of them stalls the others. Decoders still run whenever a
    # session thread waits, and the queue of decoded batches keeps the session fed.
    os.nice(DECODER_NICENESS)


def _decode_batch(items: list[tuple[str, str | None]], size: int) -> list[Decoded]:
    return [decode_for_model(path, size, problem) for path, problem in items]


def _decode_apart(items: list[tuple[str, str | None]], size: int, context) -> list[Decoded]:
    """Decode a batch in a process of its own; where that process dies (a decoder that crashes
    or runs out of memory on some file), halve the batch until the file is found: it gets an
    error row and the scan goes on. A batch without such a file costs one process start."""
    try:
        with ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker) as alone:
            return alone.submit(_decode_batch, items, size).result()
    except BrokenProcessPool:
        if len(items) == 1:
            return [(None, None, f"{items[0][0]}: the decoding process died on it (a crash or out of memory); "
                                 "left out")]
        half = len(items) // 2
        return _decode_apart(items[:half], size, context) + _decode_apart(items[half:], size, context)


def scan_local(
    model: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    threads: int | None = None,
    shard_size: int = 10_000,
    embeddings: str | None = None,
    since: list[str | Path] | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> dict:
    """Scan SOURCE with MODEL into OUT (Parquet shards + scan.json), resuming a killed scan.

    Args:
        model: the exported .onnx file.
        source: a folder, a .jsonl manifest or a text file of paths (see ``source_entries``).
        out: the output folder.
        batch_size: images per onnxruntime run.
        workers: decoding processes (default: the CPUs this process may use).
        threads: onnxruntime intra-op threads (default: the same).
        shard_size: inputs per shard file; fixed for the life of an output folder.
        embeddings: None, or "float16" / "float32": write the model's image embedding too
            (an ``embedding`` column; fixed for the life of an output folder).
        since: earlier scan folders of the same model: only files they have not scored as
            they are now are scored (``waterdrop.scan.incremental``).
        retry_errors: with ``since``, score again files whose earlier row is an error.
        progress: show a progress line with images/s.

    Returns:
        The scan.json record (``this_run`` has seen, scored, errors, seconds, images_per_s).
    """
    workers = workers or available_cpus()
    threads = threads or available_cpus()
    predictor = Predictor(model, threads=threads, session_config=NO_SPINNING)
    builder = RowBuilder(predictor, embeddings)
    spec = scan_spec(model, source, shard_size, embeddings, since)
    previous = Previous(since, spec["model_sha256"], embeddings, retry_errors) if since else None
    store = ShardStore(out, spec, builder.metadata)
    meter = Meter(progress, total=Counter(source) if progress else None,
                  passed_over=(lambda: previous.skipped) if previous else None)
    pending: deque[tuple[int, list[Entry], bool, Future, ProcessPoolExecutor]] = deque()
    shard_rows: list[dict] = []
    context = multiprocessing.get_context("spawn")

    def start_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker)

    pool = start_pool()

    def finish_oldest() -> None:
        nonlocal pool
        shard, batch, last, future, submitted_to = pending.popleft()
        items = [(entry.path, entry.problem) for entry in batch]
        try:
            decoded = future.result()
        except BrokenProcessPool:
            # A decoding process died, and with it every batch in flight. Later batches go to a
            # new pool; each failed batch is decoded apart until the file that kills is found.
            if submitted_to is pool:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = start_pool()
            decoded = _decode_apart(items, predictor.size, context)
        shard_rows.extend(builder.rows([e.index for e in batch], [e.path for e in batch], decoded,
                                       [(e.size, e.mtime_ns, e.content_hash) for e in batch]))
        meter.tick(len(batch))
        if last:
            table = builder.table(shard_rows)
            store.write(shard, table)
            meter.add(table)
            shard_rows.clear()

    try:
        for shard, entries in shards_left(source, shard_size, previous, store, meter, builder.table([])):
            for offset in range(0, len(entries), batch_size):
                batch = entries[offset : offset + batch_size]
                items = [(entry.path, entry.problem) for entry in batch]
                try:
                    future = pool.submit(_decode_batch, items, predictor.size)
                except BrokenProcessPool:  # died before its failed batches were collected
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = start_pool()
                    future = pool.submit(_decode_batch, items, predictor.size)
                last = offset + batch_size >= len(entries)
                pending.append((shard, batch, last, future, pool))
                while len(pending) > 2 * workers + 2:
                    finish_oldest()
        while pending:
            finish_oldest()
    finally:
        pool.shutdown(cancel_futures=True)
    settings = {"engine": "local", "batch_size": batch_size, "workers": workers, "threads": threads}
    return store.finish(with_since(meter.close(), previous, store.out), settings, builder.metadata)
