"""Atomic publishing of index versions under an index root.

Layout of a root:
    CURRENT            symlink -> v-<version>, the published version
    v-<version>/       one complete, immutable index version (manifest.json + data files)
    .tmp-<pid>-<hex>/  work in progress of a running (or killed) build, never read by a server
    .lock              serialises publishing and pruning between concurrent builds

Readers only ever follow CURRENT to a complete directory: a version directory appears by one rename of a finished,
fsynced temp directory, and CURRENT moves by one os.replace of a symlink. A build that fails or dies at any point
before that rename changes nothing a reader sees; its temp directory is removed by the build itself (failure) or by
the next build (kill, detected by its pid being dead).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rag_service.core.errors import BuildError
from rag_service.index.manifest import MANIFEST_FILE, write_manifest

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
VERSION_PREFIX = "v-"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
_TMP_RE = re.compile(r"^\.(?:tmp|CURRENT\.tmp)-(\d+)-[0-9a-f]+$")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Data of every file, then the directory entry itself: after this a crash cannot leave a half-written file."""
    for path in Path(directory).iterdir():
        if path.is_file():
            fsync_path(path)
    fsync_path(directory)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(root: Path) -> list[Path]:
    """Deletes temp directories and links left by builds whose process is gone; returns what it removed."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        match = _TMP_RE.match(path.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        log.info("removing %s left by dead build process %s", path, match.group(1))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def make_tmp_dir(root: Path) -> Path:
    path = root / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    with open(root / LOCK_FILE, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def current_version_dir(root: Path) -> Path | None:
    link = root / CURRENT
    if not link.is_symlink():
        return None
    return (root / os.readlink(link)).resolve()


def version_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(VERSION_PREFIX) and p.is_dir() and not p.is_symlink()]


def publish(root: Path, tmp_dir: Path, manifest: dict[str, Any], keep: int = 3) -> Path:
    """Writes `manifest` (its "version" made unique within `root`) into the finished `tmp_dir`, renames it to
    v-<version>, points CURRENT at it and prunes old versions. Returns the published version directory."""
    link = root / CURRENT
    if link.exists() and not link.is_symlink():
        raise BuildError(f"{link} exists and is not a symlink; refusing to replace it")
    with root_lock(root):
        base = manifest["version"]
        version = base
        n = 1
        # Two builds of the same data in the same second would collide.
        while (root / f"{VERSION_PREFIX}{version}").exists():
            n += 1
            version = f"{base}-{n}"
        manifest = {**manifest, "version": version}
        write_manifest(tmp_dir, manifest)
        fsync_tree(tmp_dir)
        final = root / f"{VERSION_PREFIX}{version}"
        os.rename(tmp_dir, final)
        fsync_path(root)

        # Relative target, so the whole root can be moved or mounted elsewhere.
        tmp_link = root / f".{CURRENT}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        os.symlink(final.name, tmp_link)
        try:
            os.replace(tmp_link, link)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            raise BuildError(f"cannot point {link} at {final.name}: {e}") from e
        fsync_path(root)
        log.info("published %s", final)
        prune(root, keep)
    return final


def _created_at(version_dir: Path) -> tuple[str, float]:
    try:
        with open(version_dir / MANIFEST_FILE, encoding="utf-8") as f:
            created = str(json.load(f).get("created_at", ""))
    except (OSError, ValueError):
        created = ""
    return created, version_dir.stat().st_mtime


def prune(root: Path, keep: int) -> list[Path]:
    """Deletes all but the newest `keep` versions, never the one CURRENT points to. A server still serving a deleted
    version keeps working: its mapped files stay valid until it unmaps them."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    current = current_version_dir(root)
    versions = sorted(version_dirs(root), key=_created_at, reverse=True)
    removed = []
    for old in versions[keep:]:
        if current is not None and old.resolve() == current:
            continue
        # Renamed out of the v-* namespace first, so a kill mid-delete never leaves a half-deleted "version"; the
        # leftover is a .tmp-<pid>-* directory that the next build cleans up.
        doomed = root / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
        log.info("pruned %s", old)
    return removed
