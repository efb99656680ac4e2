"""A loaded index's memory-mapped files, made resident before the first search.

The index's arrays (vectors, postings, windows, tokens, texts) are memory-mapped: a page is read from the file, or
only entered in the process's page tables, the first time a search touches it. At 1M passages that was ~20 page
faults per search over a run's first pass, and a page the kernel had dropped from its cache meanwhile (another
process's memory) costs a read from disk in the middle of a search: a rerank of 21 ms where 0.2 is usual
(bench/README.md, "Issue 15", "The index's pages resident at load"). So, once an index is loaded, every page of its
mappings is faulted in at once (madvise MADV_POPULATE_READ, Linux 5.14+; MADV_WILLNEED's read-ahead on older
kernels), when they fit in a share of the memory available; past it the kernel keeps choosing, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22
# The mappings are populated only when they take at most this share of MemAvailable: a larger index would push
# out the rest of the machine's cache, or its own other pages, for pages a search may never read.
SHARE_OF_AVAILABLE = 0.5


@dataclass(frozen=True)
class Residency:
    """What make_resident did: the bytes of the index's mappings, those made resident, how long it took, and why
    nothing was done ("" when it was)."""

    mapped_bytes: int
    resident_bytes: int
    seconds: float
    skipped: str = ""


def file_mappings(directory: Path | str) -> list[tuple[int, int, str]]:
    """This process's mappings of files inside `directory`: (start, end, path), from /proc/self/maps."""
    root = str(Path(directory).resolve())
    prefix = root.rstrip("/") + "/"
    out = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            if not path.startswith(prefix):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, path))
    return out


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_resident(directory: Path | str, *, share: float = SHARE_OF_AVAILABLE) -> Residency:
    """Faults in every page of this process's mappings of files in `directory` (an index's version directory),
    when they add up to at most `share` of the available memory. Never raises for what the kernel refuses: the
    index then pages in as before, and `skipped` says why."""
    started = time.perf_counter()
    if not sys.platform.startswith("linux"):
        return Residency(0, 0, 0.0, "not Linux")
    try:
        maps = file_mappings(directory)
    except OSError as e:
        return Residency(0, 0, 0.0, f"cannot read /proc/self/maps: {e}")
    mapped = sum(end - start for start, end, _ in maps)
    if not maps:
        return Residency(0, 0, 0.0, "no file of the index is mapped")
    limit = int(available_bytes() * share)
    if mapped > limit:
        return Residency(mapped, 0, 0.0, f"its mappings ({mapped >> 20} MiB) exceed {share:.0%} of the available "
                                         f"memory ({limit >> 20} MiB)")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    advice, resident, problem = MADV_POPULATE_READ, 0, ""
    for start, end, path in maps:
        if libc.madvise(start, end - start, advice) != 0:
            err = ctypes.get_errno()
            if advice == MADV_POPULATE_READ and err == errno.EINVAL:
                # A kernel before 5.14: ask for the read-ahead instead (the pages then fault in without a read).
                advice = MADV_WILLNEED
                if libc.madvise(start, end - start, advice) == 0:
                    resident += end - start
                    continue
                err = ctypes.get_errno()
            problem = f"madvise of {os.path.basename(path)}: {os.strerror(err)}"
            continue
        resident += end - start
    return Residency(mapped, resident, time.perf_counter() - started, problem)
