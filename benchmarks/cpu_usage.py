"""Where a benchmark's time went: wall, user and system CPU time, page faults, memory.

Benchmarks that time training or scanning record these beside their images/s, so that a
run whose time goes to the kernel (glibc's mmap churn, see ``waterdrop/allocator.py``)
shows it. ``Usage`` measures a block of this process and the children it waited for;
``run_measured`` runs a command and also samples the resident memory of its whole process
tree from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import threading
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (runs on 2-core machines of different CPUs do not reproduce each other)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rusage() -> tuple[float, float, int, int]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + children.ru_utime, own.ru_stime + children.ru_stime,
            own.ru_minflt + children.ru_minflt, own.ru_majflt + children.ru_majflt)


class Usage:
    """``with Usage() as usage: ...``, then ``usage.record``: wall_s, user_s, system_s,
    system_share (of CPU time), minor_faults_m (millions), major_faults and peak_rss_mib
    (the largest of this process and its waited-for children, over their whole lives)."""

    def __enter__(self) -> Usage:
        self.started, self.before = time.perf_counter(), _rusage()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.started
        after = _rusage()
        user, system, minor, major = (b - a for a, b in zip(self.before, after, strict=True))
        peak_kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        self.record = {"wall_s": round(wall, 2), "user_s": round(user, 2), "system_s": round(system, 2),
                       "system_share": round(system / max(user + system, 1e-9), 4),
                       "minor_faults_m": round(minor / 1e6, 3), "major_faults": major,
                       "peak_rss_mib": round(peak_kib / 1024)}


def _proportional_kib(entry: Path) -> int:
    """A process's proportional set size (KiB): its private pages plus its share of pages it
    shares (a forked data-loader worker shares most of its parent's), so a tree's sum counts
    each page once."""
    for line in (entry / "smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _tree_memory(root: int) -> dict[int, tuple[int, int]]:
    """(resident bytes, proportional bytes) of ``root`` and every descendant, by pid."""
    parents, memory = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            resident = int((entry / "statm").read_text().split()[1]) * page
            proportional = _proportional_kib(entry) * 1024
        except (OSError, ValueError):
            continue  # the process ended while we looked, or is not ours to read
        parents[int(entry.name)] = parent
        memory[int(entry.name)] = (resident, proportional)
    tree, grown = {root}, True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    return {pid: memory[pid] for pid in tree if pid in memory}


def run_measured(command: list[str], env: dict | None = None, cwd: str | Path | None = None,
                 interval: float = 0.5, **popen) -> dict:
    """Run ``command`` to its end; its :class:`Usage` record plus, from /proc samples every
    ``interval`` s: ``tree_peak_pss_mib`` (all its processes together, shared pages counted
    once), and for the process that grew largest its ``largest_process_peak_rss_mib`` and
    ``largest_process_end_rss_mib`` (its last sample before it ended: memory kept after its
    largest phase), and ``returncode``."""
    peaks: dict[int, int] = {}
    last: dict[int, int] = {}
    tree_peak = 0
    with Usage() as usage:
        process = subprocess.Popen(command, env=env, cwd=cwd, **popen)
        done = threading.Event()

        def sample() -> None:
            nonlocal tree_peak
            while not done.is_set():
                current = _tree_memory(process.pid)
                tree_peak = max(tree_peak, sum(proportional for _, proportional in current.values()))
                for pid, (resident, _) in current.items():
                    if resident:  # an exited process not yet waited for reads as 0
                        peaks[pid] = max(peaks.get(pid, 0), resident)
                        last[pid] = resident
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = process.wait()
        done.set()
        sampler.join()
    record = dict(usage.record, returncode=returncode, tree_peak_pss_mib=round(tree_peak / 2**20))
    if peaks:
        largest = max(peaks, key=peaks.get)
        record.update(largest_process_peak_rss_mib=round(peaks[largest] / 2**20),
                      largest_process_end_rss_mib=round(last[largest] / 2**20))
    return record
