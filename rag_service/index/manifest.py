"""manifest.json: what an index version holds, how it was built, and a size + sha256 for every other file in it."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rag_service.core.errors import IndexFormatError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
_READ_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """{name: {bytes, sha256}} for every file in `directory` except the manifest, sorted by name."""
    entries = {}
    for path in sorted(Path(directory).iterdir()):
        if path.name == MANIFEST_FILE or not path.is_file():
            continue
        entries[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def content_digest(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the names and checksums of the data files: equal data gives an equal digest."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return digest.hexdigest()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_version(created: datetime, files: dict[str, dict[str, Any]]) -> str:
    """e.g. 20261128T190102Z-1a2b3c4d: sorts by time, and the suffix tells equal data apart from changed data."""
    return f"{created.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{content_digest(files)[:8]}"


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a version directory, after checking it is one this code can read."""
    path = Path(directory) / MANIFEST_FILE
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path}: unreadable: {e}") from e
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{path}: not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: unknown format_version {version!r} (this build reads {FORMAT_VERSION})")
    for key in ("name", "version", "files", "counts", "model", "analyzer", "params"):
        if key not in manifest:
            raise IndexFormatError(f"{path}: no {key!r} entry")
    if not isinstance(manifest["files"], dict):
        raise IndexFormatError(f"{path}: 'files' is not an object")
    return manifest


def check_files(directory: Path, manifest: dict[str, Any], checksums: bool = True) -> None:
    """Raises IndexFormatError for the first file that is missing, of the wrong size or (with `checksums`) whose
    sha256 differs. Sizes are cheap and always checked; checksums read every byte."""
    directory = Path(directory)
    for name, entry in manifest["files"].items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IndexFormatError(f"{path}: missing") from None
        if size != entry["bytes"]:
            raise IndexFormatError(f"{path}: size mismatch: {size} bytes, manifest says {entry['bytes']}")
        if checksums:
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise IndexFormatError(
                    f"{path}: checksum mismatch: sha256 {actual[:16]}..., manifest says {entry['sha256'][:16]}..."
                )


def verify(directory: Path | str) -> dict[str, Any]:
    """Full check of a version directory (format version, every file's presence, size and sha256); returns the
    manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_files(directory, manifest, checksums=True)
    return manifest
