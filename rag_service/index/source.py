"""The source documents of an index version (documents.jsonl, BEIR layout), kept so that an incremental update
(index/update.py) can re-derive every artifact from exactly the documents a full build would have read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rag_service.index.chunking import Document

SOURCE_FILE = "documents.jsonl"


def write_documents(directory: Path, docs: Sequence[Document]) -> Path:
    path = Path(directory) / SOURCE_FILE
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            record: dict[str, Any] = {"_id": d.id, "title": d.title, "text": d.text}
            if d.metadata:
                record["metadata"] = d.metadata
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
