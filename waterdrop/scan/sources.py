"""Streaming readers for a scan's SOURCE: a folder, a JSONL manifest (parsed by
``waterdrop.records``, as every task split is) or a text file of paths.

Pools hold millions of images, so nothing here loads or sorts a whole source: each reader
is a generator that holds one line, or one folder's entries, at a time. The order is
stable (the same source gives the same order on every run), which is what lets a killed
scan resume by shard index.

A folder is walked depth-first with ``os.scandir``, each folder's entries sorted by name.
Memory is bounded by the largest single folder, not by the pool. The trade-off against
``waterdrop.imageio.list_images`` (one sorted list of every path): the order differs
where a name and a folder name share a prefix (``a/x.jpg`` comes before ``a.jpg`` here),
and a folder that changes between two runs shifts the shards; ``ShardStore.is_done``
detects that when it resumes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from waterdrop.imageio import IMAGE_SUFFIXES
from waterdrop.records import is_manifest, parse_manifest


class Entry(NamedTuple):
    """One input of a scan: the file to open, or why the source line does not name one; its
    size and modification time when read (``with_file_state``), to tell a changed file, or the
    content hash a manifest line gives for it (``content_hash``), which then decides alone."""

    path: str
    problem: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    index: int = -1  # its position in the source
    content_hash: str | None = None


def with_file_state(entries: Iterable[Entry]) -> Iterator[Entry]:
    """The entries with their files' size and modification time (None where the file cannot
    be read: its decode reports why). An entry with a content hash is not looked at: on
    network storage a million stats cost minutes, and the hash already tells a changed file."""
    for entry in entries:
        if entry.problem is None and entry.content_hash is None:
            try:
                state = os.stat(entry.path)
                entry = entry._replace(size=state.st_size, mtime_ns=state.st_mtime_ns)
            except OSError:
                pass
        yield entry


def walk_folder(root: str | Path) -> Iterator[str]:
    """Image files under ``root``, depth-first, each folder's entries sorted by name.

    Hidden files and folders are left out (as ``list_images`` does). Symbolic links to
    folders are not followed (a link cycle would never end); a link to a file is listed, a
    dangling one too, so that it gets its error row.
    """
    try:
        with os.scandir(root) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return  # a folder we may not read is skipped, like os.walk does
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from walk_folder(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and not entry.is_dir():
            yield entry.path


def read_path_list(list_file: str | Path) -> Iterator[Entry]:
    """One path a line; a relative path is relative to the list file's folder; blank lines skipped."""
    base = os.path.dirname(os.path.abspath(list_file))
    # surrogateescape: a path that is not valid UTF-8 still opens the file it names.
    with open(list_file, encoding="utf-8", errors="surrogateescape") as lines:
        for line in lines:
            path = line.rstrip("\r\n")
            if path.strip():
                yield Entry(os.path.normpath(os.path.join(base, path)))


def manifest_entries(manifest: str | Path) -> Iterator[Entry]:
    """The images of a manifest (read by ``waterdrop.records.parse_manifest``); other keys are ignored.

    A line that names no image still gives an entry (named ``MANIFEST:LINE``) whose problem
    becomes that row's error, so a typo in line 3,000,000 costs one row, not the scan. A
    ``content_hash`` string (a sha256, an object store's ETag) is the file's state for
    incremental scans; another type is that line's problem.
    """
    for line in parse_manifest(manifest):
        content_hash = None if line.item is None else line.item.get("content_hash")
        if line.item is None:
            yield Entry(f"{manifest}:{line.number}", f"manifest line {line.number}: {line.problem}")
        elif content_hash is not None and (not isinstance(content_hash, str) or not content_hash):
            yield Entry(os.path.abspath(line.item["image"]),
                        f"manifest line {line.number}: 'content_hash' must be a non-empty string, got {content_hash!r}")
        else:
            yield Entry(os.path.abspath(line.item["image"]), content_hash=content_hash)


def source_entries(source: str | Path) -> Iterator[Entry]:
    """The entries of a folder (recursive), a ``.jsonl`` manifest or a text file of paths.

    Raises:
        ValueError: the source does not exist, or is a single image.
    """
    source = str(source)
    if os.path.isdir(source):  # absolute, like the paths a list or a manifest gives: rows name their file anywhere
        return (Entry(path) for path in walk_folder(os.path.abspath(source)))
    if not os.path.isfile(source):
        raise ValueError(f"{source}: no such folder or file")
    suffix = os.path.splitext(source)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        raise ValueError(f"{source} is an image; give a folder, a .jsonl manifest or a text file of paths")
    return manifest_entries(source) if is_manifest(source) else read_path_list(source)


class Counter(threading.Thread):
    """Counts a source's inputs beside the scan (a second streamed pass), for the progress
    line's share done and time left; ``count`` grows until ``finished``."""

    def __init__(self, source: str | Path):
        super().__init__(daemon=True)
        self.source, self.count, self.finished = source, 0, False
        self.start()

    def run(self) -> None:
        for _ in source_entries(self.source):
            self.count += 1
        self.finished = True
