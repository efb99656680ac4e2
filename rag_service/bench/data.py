"""Readers for BEIR-layout evaluation sets: queries.jsonl (or plain lines) and qrels TSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def load_queries(path: Path) -> dict[str, str]:
    """BEIR queries.jsonl ({"_id", "text"}) or a plain text file with one query per line (ids are line numbers)."""
    queries: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                    queries[str(record["_id"])] = record["text"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(f"{path}:{n}: not a BEIR query record ({error})") from error
            else:
                queries[str(n)] = line
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV: query-id, corpus-id, score, with a header line."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (n == 1 and not row[-1].lstrip("-").isdigit()):
                continue  # blank line or header
            if len(row) < 3:
                raise ValueError(f"{path}:{n}: expected query-id, corpus-id, score")
            qrels.setdefault(row[0], {})[row[1]] = int(row[-1])
    return qrels
