"""An index's memory-mapped files made resident at load (rag_service/index/resident.py): every page of the mappings
inside the index's directory is in the process's page tables afterwards, checked in /proc/self/smaps."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from rag_service.index.resident import file_mappings, make_resident

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and madvise (Linux)")


def resident_bytes(directory: Path) -> tuple[int, int]:
    """(bytes mapped from files in `directory`, of them in the page tables), from /proc/self/smaps."""
    prefix = str(directory.resolve()).rstrip("/") + "/"
    mapped = rss = 0
    inside = False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
                inside = len(parts) >= 6 and parts[5].startswith(prefix)
                if inside:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    mapped += end - start
            elif inside and parts[0] == "Rss:":
                rss += int(parts[1]) * 1024
    return mapped, rss


def test_an_untouched_mapping_is_faulted_in(tmp_path):
    np.save(tmp_path / "rows.npy", np.arange(6 << 20, dtype=np.float32))  # 24 MiB
    rows = np.load(tmp_path / "rows.npy", mmap_mode="r")
    mapped, before = resident_bytes(tmp_path)
    assert mapped >= rows.nbytes and before < mapped // 2
    result = make_resident(tmp_path)
    assert result.skipped == "" and result.mapped_bytes == mapped and result.resident_bytes == mapped
    assert resident_bytes(tmp_path) == (mapped, mapped)
    assert float(rows[-1]) == float((6 << 20) - 1)


def test_mappings_past_the_share_of_memory_are_left_to_the_kernel(tmp_path):
    np.save(tmp_path / "rows.npy", np.zeros(1 << 20, dtype=np.float32))
    rows = np.load(tmp_path / "rows.npy", mmap_mode="r")
    mapped, before = resident_bytes(tmp_path)
    result = make_resident(tmp_path, share=0.0)
    assert "exceed" in result.skipped and result.resident_bytes == 0 and result.mapped_bytes == mapped
    assert resident_bytes(tmp_path) == (mapped, before)
    del rows


def test_a_directory_with_nothing_mapped(tmp_path):
    (tmp_path / "other").mkdir()
    np.save(tmp_path / "other" / "x.npy", np.zeros(10))
    kept = np.load(tmp_path / "other" / "x.npy", mmap_mode="r")
    assert file_mappings(tmp_path / "other") and not file_mappings(tmp_path / "oth")  # a directory, not a prefix
    assert make_resident(tmp_path / "none").skipped == "no file of the index is mapped"
    del kept


@pytest.mark.parametrize("resident", [True, False])
def test_the_loader_makes_the_index_resident_after_its_warm_up(built_index, encoder, caplog, resident):
    from rag_service.api.loader import load_searcher
    from rag_service.core.config import ServerConfig

    with caplog.at_level(logging.INFO, logger="rag_service.api.loader"):
        searcher = load_searcher(ServerConfig(index=built_index, resident_index=resident, warmup_queries=2),
                                 encoder)
    try:
        version = Path(searcher.summary().path)
        mapped, rss = resident_bytes(version)
        assert mapped > 0
        said = [r.getMessage() for r in caplog.records if "pages resident" in r.getMessage()]
        if resident:
            assert rss == mapped and len(said) == 1 and f"index {searcher.summary().name} pages resident" in said[0]
        else:
            assert not said
    finally:
        searcher.close()
