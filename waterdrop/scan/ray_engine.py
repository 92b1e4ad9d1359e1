"""The Ray engine: the same scan on Ray Data, so that it runs unchanged on a cluster.

The driver streams the source and cuts it into windows of whole shards (``window``
inputs, rounded up to shards; finished shards are skipped). Each window is one Ray Data
run: ``from_items`` -> ``map_batches`` over a pool of ``RayScorer`` actors, whose rows
(scores, and embeddings where asked) stream back to the driver. The driver writes each
shard of the window as ``shard-NNNNNN.parquet``, rows sorted by input index, with the same
atomic rename as the local engine, so both engines give the same files and one can resume
the other. (Ray Data's ``write_parquet`` was dropped: its write tasks start a Python worker
every few seconds that Ray's idle-worker reaper then kills, about 1.2 s of CPU each, a fifth
of a 2-core machine; RESULTS.md, scan_speed.py.)

Decoding runs in one of two places (``decode``):

- ``inside`` (default): each actor decodes its batch, then infers. Actors of one thread each
  (``threads=1``, one actor per CPU) keep every core busy with decode then inference, and
  pixels never travel through the object store.
- ``tasks``: a ``map_batches`` stage of Ray tasks decodes (``decode_cpus`` logical CPUs each)
  and hands uint8 pixels (~110 KB an image at 192 px) to the scoring actors through the object
  store; Ray Data's streaming executor runs both stages at once. This is the layout for an
  accelerator: decoding on every CPU of the cluster, inference on the actors (which run
  onnxruntime on CPU today; a CUDA actor is not built).
  On CPUs alone the two stages share the cores, as the local engine's decoders and session do
  (RESULTS.md, scan_speed.py, compares both layouts).

Windows bound the driver's memory (a window's paths and rows are in Ray's object store) and are
the unit of resumption for this engine; each Ray run starts its actors anew (a few
seconds), so a window should hold a few minutes of work for the whole cluster.

On a cluster, the model is shipped through the object store and the rows come back to the
driver, which writes OUT; the images must be on storage that every node sees at the same
path (NFS or similar).

A file that kills its actor (a decoder crash, the out-of-memory killer): Ray Data would
restart the actor and retry the batch forever; here the actor is restarted once, then the
window fails and is scored again batch by batch in Ray tasks that are not retried, a batch
whose worker dies halved until the file is found. It gets an error row and the scan goes on.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa

from waterdrop.runtime import Predictor
from waterdrop.scan.incremental import Previous, shards_left, with_since
from waterdrop.scan.local import DECODER_NICENESS, NO_SPINNING
from waterdrop.scan.rows import RowBuilder, decode_for_model, printable
from waterdrop.scan.sources import Counter, Entry
from waterdrop.scan.store import Meter, ScanError, ShardStore, scan_spec


@contextmanager
def _without(logger: logging.Logger, notice: str) -> Iterator[None]:
    """Drop one notice from what ``logger``'s handlers print (records of its children included)."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return notice not in record.getMessage()

    drop = Drop()
    for handler in logger.handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in logger.handlers:
            handler.removeFilter(drop)


def import_ray() -> ModuleType:
    """Ray and Ray Data, or an ImportError that says how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs the [data] extra's pandas)
    except ImportError as err:
        hint = "install it with: pip install waterdrop[scan]"
        raise ImportError(f"the Ray engine needs Ray Data ({err}); {hint}") from err
    return ray


class RayScorer:
    """``map_batches`` callable: one onnxruntime session per actor, decoding inside the actor.

    Args:
        model: the .onnx file's bytes (Ray ships them with the actor's constructor), written
            to a local temporary file, so the model need not be on shared storage.
        threads: onnxruntime intra-op threads, set explicitly: onnxruntime ignores cgroup
            limits and Ray's OMP_NUM_THREADS and would start one thread per core of the node.
    """

    def __init__(self, model: bytes, threads: int, embeddings: str | None = None, shares_cores: bool = False):
        import cv2

        cv2.setNumThreads(1)  # the actor's CPUs are for onnxruntime
        handle, path = tempfile.mkstemp(suffix=".onnx")
        with os.fdopen(handle, "wb") as stream:
            stream.write(model)
        try:
            # Beside decoding tasks, spinning onnxruntime threads would take CPU time from them.
            self.predictor = Predictor(path, threads=threads, session_config=NO_SPINNING if shares_cores else None)
        finally:
            os.remove(path)
        self.builder = RowBuilder(self.predictor, embeddings)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = [os.fsdecode(path) for path in batch["path"]]
        if "pixels" in batch:  # decoded by the decoding stage
            decoded = [(pixels, (int(width), int(height)), None) if not error else (None, None, error)
                       for pixels, width, height, error in zip(batch["pixels"], batch["width"], batch["height"],
                                                               batch["error"])]
        else:
            problems = [problem or None for problem in batch["problem"]]
            decoded = [decode_for_model(path, self.predictor.size, problem) for path, problem in zip(paths, problems)]
        states = [_file_state(*state) for state in zip(batch["file_bytes"], batch["mtime_ns"], batch["content_hash"])]
        table = self.builder.table(self.builder.rows(batch["index"].tolist(), paths, decoded, states))
        return table.append_column("shard", pa.array(batch["shard"], pa.int64()))


#: An item's file state: size and time (-1: not known), the manifest's content hash ("": none).
STATE_KEYS = ("file_bytes", "mtime_ns", "content_hash")


def _file_state(size: int, mtime_ns: int, content_hash: str) -> tuple[int | None, int | None, str | None]:
    """A file's state as rows record it, from an item's placeholders."""
    return None if size < 0 else int(size), None if mtime_ns < 0 else int(mtime_ns), content_hash or None


def decode_stage(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """``map_batches`` task of the decoding stage: the batch's images decoded for the model, as
    one uint8 array (zeros where an image failed, whose ``error`` says why)."""
    import cv2

    cv2.setNumThreads(1)  # one task per CPU already
    # As the local engine's decoders: below the actors' onnxruntime threads (which meet at a
    # barrier after every operator), 109 -> 122 images/s on 2 cores. The worker keeps it for
    # later tasks (Ray never reuses a task worker for an actor): in a scan, decoding tasks again
    # or a window scored apart; tasks of a caller that shares its Ray instance too.
    os.setpriority(os.PRIO_PROCESS, 0, DECODER_NICENESS)
    paths = [os.fsdecode(path) for path in batch["path"]]
    pixels = np.zeros((len(paths), size, size, 3), np.uint8)
    width, height, errors = np.full(len(paths), -1, np.int64), np.full(len(paths), -1, np.int64), []
    for k, (path, problem) in enumerate(zip(paths, batch["problem"])):
        image, original, error = decode_for_model(path, size, problem or None)
        if image is not None:
            pixels[k], (width[k], height[k]) = image, original
        errors.append(error or "")
    return {**batch, "pixels": pixels, "width": width, "height": height, "error": np.array(errors, dtype=object)}


#: Restarts of a dead scoring actor, and retries of its batch, before the window is scored apart.
ACTOR_RESTARTS = 1


def _died(err: BaseException) -> bool:
    """Whether a Ray error may report a dead worker or actor (a crash, the out-of-memory killer);
    Ray Data wraps an actor's death in types that differ by version, so the message counts too.
    It only decides whether a window is scored again apart, where errors are told exactly."""
    from ray import exceptions

    dead = (exceptions.WorkerCrashedError, exceptions.RayActorError, exceptions.OutOfMemoryError,
            exceptions.ActorDiedError)
    seen, current = set(), err
    while current is not None and id(current) not in seen:
        if isinstance(current, dead) or "died" in str(type(current).__name__).lower():
            return True
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__
    return "died" in str(err) or "WorkerCrashedError" in str(err) or "SIGKILL" in str(err)


def _score_batch(scorer_args: dict, batch: dict) -> pa.Table:
    return RayScorer(**scorer_args)(batch)


def _score_apart(ray, items: list[dict], batch_size: int, scorer_args: dict, schema: pa.Schema) -> pa.Table:
    """A window's rows scored batch by batch in Ray tasks that are not retried, all submitted at
    once; a batch whose worker dies is halved until the file that kills it is found, and that
    file gets an error row. As the local engine does with its decoding processes."""
    score = ray.remote(max_retries=0)(_score_batch)
    shipped = ray.put(scorer_args)  # the model's bytes once, not once a task

    def columns(rows: list[dict]) -> dict:
        text = ("path", "problem", "content_hash")
        return {key: np.array([row[key] for row in rows], dtype=object if key in text else None)
                for key in ("shard", "index", *text, "file_bytes", "mtime_ns")}

    def submitted(rows: list[dict]) -> tuple[list[dict], object]:
        return rows, score.remote(shipped, columns(rows))

    def collect(rows: list[dict], future) -> list[pa.Table]:
        try:
            return [ray.get(future)]
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError):
            pass  # not retried: the worker died on this batch; any other error is raised
        if len(rows) > 1:
            halves = [submitted(rows[: len(rows) // 2]), submitted(rows[len(rows) // 2:])]
            return [table for half in halves for table in collect(*half)]
        row = rows[0]
        path = os.fsdecode(row["path"])
        why = row["problem"] or f"{path}: the scoring process died on it (a crash or out of memory); left out"
        state = dict(zip(STATE_KEYS, _file_state(*(row[key] for key in STATE_KEYS))))
        failed = pa.Table.from_pylist([{"index": row["index"], "path": printable(path), "error": why, **state}],
                                      schema=schema)
        return [failed.append_column("shard", pa.array([row["shard"]], pa.int64()))]

    batches = [submitted(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
    tables = [table for batch in batches for table in collect(*batch)]
    return pa.concat_tables(tables, promote_options="default").sort_by("index")


def scan_ray(
    model: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    actors: int | None = None,
    threads: int = 1,
    shard_size: int = 10_000,
    window: int = 100_000,
    address: str | None = None,
    decode: str = "inside",
    decode_cpus: float = 1.0,
    actor_cpus: float | None = None,
    embeddings: str | None = None,
    since: list[str | Path] | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> dict:
    """Scan SOURCE with MODEL into OUT on Ray Data; the same files as ``scan_local``.

    Args:
        model, source, out, batch_size, shard_size, embeddings, since, retry_errors, progress: as for
            ``scan_local``.
        actors: scoring actors (default: the cluster's CPUs // threads).
        threads: onnxruntime threads (and Ray CPUs) per actor.
        window: inputs per Ray Data run (rounded up to whole shards).
        address: a running cluster (``auto`` for the local node's); None starts Ray here
            unless the caller already did.
        decode: ``inside`` the scoring actors, or in a stage of Ray ``tasks`` before them (see
            the module's notes).
        decode_cpus: logical CPUs each decoding task reserves (``tasks``).
        actor_cpus: logical CPUs each actor reserves (default ``threads``); with ``tasks``, less
            than ``threads`` lets decoding share the actors' cores, as the local engine's
            decoders share its session's.

    Returns:
        The scan.json record.
    """
    ray = import_ray()
    if decode not in ("inside", "tasks"):
        raise ValueError(f"decode={decode!r}: 'inside' the actors or in 'tasks'")
    # Ray's own INFO lines (start-up, Dataset plans, progress logged every 10 s when stderr is
    # not a terminal) would bury the scan's one progress line. The driver still shows Ray's
    # warnings and errors; actors' own output stays in Ray's log files, and an actor's
    # exception still fails the scan with its traceback.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS")  # as `ray job submit` sets it
    if address:
        ray.init(address=address, ignore_reinit_error=True, **quiet)
    elif not ray.is_initialized():
        with _without(logging.getLogger("ray"), "Token authentication is enabled"):  # our own local instance
            ray.init(address="local", include_dashboard=False, **quiet)  # never a stale cluster of this machine
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    cpus = ray.cluster_resources().get("CPU", 1)
    # Decoding tasks need CPUs the actors leave: by default half the cluster's go to actors.
    actor_cpus = threads if actor_cpus is None else actor_cpus
    if actor_cpus <= 0 or decode_cpus <= 0:
        raise ValueError(f"actor_cpus and decode_cpus must be above 0, got {actor_cpus} and {decode_cpus}")
    actors = actors or max(1, int(cpus // actor_cpus // (2 if decode == "tasks" else 1)))
    if decode == "tasks" and actors * actor_cpus + decode_cpus > cpus:
        raise ValueError(f"{actors} actors of {actor_cpus:g} CPUs leave no {decode_cpus:g} CPUs of the cluster's "
                         f"{cpus:g} for a decoding task: fewer actors, or smaller actor_cpus or decode_cpus")
    builder = RowBuilder(Predictor(model, threads=1), embeddings)  # the driver only needs the schema
    spec = scan_spec(model, source, shard_size, embeddings, since)
    previous = Previous(since, spec["model_sha256"], embeddings, retry_errors) if since else None
    store = ShardStore(out, spec, builder.metadata)
    model_bytes = Path(model).read_bytes()
    scorer_args = {"model": model_bytes, "threads": threads, "embeddings": embeddings,
                   "shares_cores": decode == "tasks"}
    meter = Meter(progress, total=Counter(source) if progress else None,
                  passed_over=(lambda: previous.skipped) if previous else None)

    def run_window(number: int, members: list[tuple[int, list[Entry]]]) -> None:
        items = [
            {"shard": shard, "index": e.index, "path": os.fsencode(e.path), "problem": e.problem or "",
             "file_bytes": -1 if e.size is None else e.size, "mtime_ns": -1 if e.mtime_ns is None else e.mtime_ns,
             "content_hash": e.content_hash or ""}
            for shard, entries in members
            for e in entries
        ]
        # Blocks of ~4 batches: small enough that no actor is left with a long last block while
        # the others idle, large enough that Ray's per-task overhead stays negligible.
        blocks = min(len(items), max(actors, -(-len(items) // (4 * batch_size))))
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        if decode == "tasks":
            dataset = dataset.map_batches(decode_stage, fn_kwargs={"size": builder.predictor.size},
                                          batch_size=batch_size, num_cpus=decode_cpus, max_retries=0)
        dataset = dataset.map_batches(
            RayScorer,
            fn_constructor_kwargs=scorer_args,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus,
            # Ray Data restarts a dead actor and retries its task forever by default: a file that
            # kills its decoder would loop. One retry rides out a lost node; then the window fails.
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
        )
        try:
            tables = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        except Exception as err:  # Ray wraps an actor's death in several types, by version
            if isinstance(err, ray.exceptions.RayTaskError) and not _died(err):
                raise  # a Python error in the scorer is a bug to show, not a file to isolate
            logging.getLogger(__name__).warning("scan: an actor died in window %d (%s); scoring its batches apart",
                                                number, type(err).__name__)
            table = _score_apart(ray, items, batch_size, scorer_args, builder.schema)
        else:
            table = pa.concat_tables(tables).sort_by("index")
            del tables  # views of object-store memory: the sorted copy is what stays
        start = 0
        for shard, entries in members:
            rows = table.slice(start, len(entries))
            start += len(entries)
            shard_ids = rows.column("shard").to_pylist()
            if len(rows) != len(entries) or set(shard_ids) != {shard}:
                raise ScanError(f"Ray returned {len(rows)} rows for shard {shard} of {len(entries)} inputs")
            rows = rows.select(builder.schema.names).cast(builder.schema)
            store.write(shard, rows)
            meter.add(rows)
            meter.tick(len(rows))
        if start != len(table):
            raise ScanError(f"Ray returned {len(table)} rows for a window of {start} inputs")

    members: list[tuple[int, list[Entry]]] = []
    number = 0
    for shard, entries in shards_left(source, shard_size, previous, store, meter, builder.table([])):
        members.append((shard, entries))
        if sum(len(e) for _, e in members) >= window:
            run_window(number, members)
            members, number = [], number + 1
    if members:
        run_window(number, members)
    settings = {"engine": "ray", "batch_size": batch_size, "actors": actors, "threads": threads, "window": window,
                "actor_cpus": actor_cpus, "decode": decode,
                **({"decode_cpus": decode_cpus} if decode == "tasks" else {})}
    return store.finish(with_since(meter.close(), previous, store.out), settings, builder.metadata)
