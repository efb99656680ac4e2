"""Collections: the named indexes one server serves, the aliases that name them, and the default collection.

A request names a collection or an alias in `collection` (empty: the default collection, which may itself be an
alias). `Collections.searcher` resolves the name once per request, on the event loop, to the searcher serving now;
the request then runs wholly on that searcher. So moving an alias, reloading or deleting a collection is one dict
assignment on the event loop: requests that resolved before it finish on what they resolved, later ones get the new
target, and none fails for the swap (tests/test_collections.py swaps under concurrent load).

Each collection loads, warms, reloads and fails on its own: one that fails to load is FAILED (its requests get
FAILED_PRECONDITION naming the error) while the others serve; a failed reload leaves the serving version in place.
Admin changes (reload, alias, delete) are serialised by one lock, so each sees the state the previous one left.

Aliases persist in the index root's ALIASES_FILE, replaced atomically (written beside, fsynced, renamed) under a lock
file, so `rag-index alias` and a running server never lose each other's changes; the server reads it at start and on
SIGHUP (`reread_aliases`), and its own SetAlias/DeleteAlias write it before they take effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from rag_service.core.config import COLLECTION_NAME, COLLECTION_NAME_RULE, ServerConfig
from rag_service.core.errors import FailedPrecondition, IndexFormatError, InvalidArgument, NotFound, Unavailable
from rag_service.core.metrics import Metrics
from rag_service.index.load import resolve_version_dir
from rag_service.index.manifest import MANIFEST_FILE
from rag_service.index.publish import CURRENT
from rag_service.search.searcher import Searcher
from rag_service.shard.split import ROUTER_FILE

log = logging.getLogger(__name__)

ALIASES_FILE = "aliases.json"
_LOCK_FILE = ".aliases.lock"

LOADING, SERVING, FAILED = "LOADING", "SERVING", "FAILED"


def check_name(name: str, field_name: str) -> str:
    if not COLLECTION_NAME.fullmatch(name):
        raise InvalidArgument(field_name, f"{name[:200]!r} is not a collection or alias name ({COLLECTION_NAME_RULE})")
    return name


# -- the aliases file --------------------------------------------------------------------------------------------------

def read_aliases(root: Path) -> dict[str, str]:
    """The aliases persisted in index root `root` (alias -> collection); none when it has no file."""
    path = Path(root) / ALIASES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise IndexFormatError(f"{path}: cannot be read: {error}") from None
    aliases = data.get("aliases") if isinstance(data, dict) else None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in aliases.items()):
        raise IndexFormatError(f"{path}: 'aliases' is not an object of names")
    return dict(aliases)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(Path(root) / _LOCK_FILE, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def update_aliases(root: Path, change: Callable[[dict[str, str]], object]) -> dict[str, str]:
    """Reads the aliases of `root`, lets `change` edit them in place, and writes them back atomically, all under the
    root's lock file; returns what was written. A reader sees the old file or the new one, never a part."""
    root = Path(root)
    with _locked(root):
        aliases = read_aliases(root)
        change(aliases)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{ALIASES_FILE}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"aliases": dict(sorted(aliases.items()))}, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, root / ALIASES_FILE)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        directory = os.open(root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return aliases


# -- what the configuration names --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    name: str
    path: Path  # index root (with CURRENT) or version directory; a router directory for a router
    shards: tuple[str, ...] = ()  # a sharded collection's shard servers: this server routes to them


def is_index_dir(path: Path) -> bool:
    return (path / CURRENT).exists() or (path / CURRENT).is_symlink() or (path / MANIFEST_FILE).is_file()


def index_name(path: Path) -> str:
    """The collection name of a plain `--index PATH`: its manifest's name (rag-index build names it after its
    folder; a router directory carries its index's), else the folder's name."""
    try:
        description = Path(path) / ROUTER_FILE if (Path(path) / ROUTER_FILE).is_file() \
            else resolve_version_dir(path) / MANIFEST_FILE
        name = json.loads(description.read_text(encoding="utf-8"))["name"]
    except (OSError, ValueError, KeyError, TypeError, IndexFormatError):
        name = None
    if isinstance(name, str) and COLLECTION_NAME.fullmatch(name):
        return name
    return Path(path).resolve().name


def collection_specs(config: ServerConfig) -> tuple[list[Spec], str | None]:
    """The collections `config` names, and the default collection (None: requests must name one)."""
    specs: dict[str, Spec] = {}
    default = config.default_collection

    def add(spec: Spec) -> None:
        other = specs.get(spec.name)
        if other is not None and other.path.resolve() != spec.path.resolve():
            raise ValueError(f"two collections named {spec.name!r}: {other.path} and {spec.path}")
        specs.setdefault(spec.name, spec)

    routed = config.router.collections
    named = bool(config.collections) or config.collections_root is not None
    if not named or "index" in config.model_fields_set or config.router.shards:
        spec = Spec(index_name(config.index), Path(config.index), tuple(config.router.shards))
        add(spec)
        default = default or spec.name
    for name, path in config.collections.items():
        add(Spec(name, Path(path), tuple(routed.get(name, ()))))
    root = config.collections_root
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"collections_root: {root} is not a directory")
        for child in sorted(root.iterdir()):
            if child.name.startswith(".") or not child.is_dir() or not is_index_dir(child):
                continue
            if not COLLECTION_NAME.fullmatch(child.name):
                log.warning("%s: not served: the folder name is not a collection name (%s)", child,
                            COLLECTION_NAME_RULE)
                continue
            add(Spec(child.name, child, tuple(routed.get(child.name, ()))))
    unknown = sorted(set(routed) - set(specs))
    if unknown:
        raise ValueError(f"router.collections: {', '.join(unknown)} is not a collection this server serves (give "
                         "its router directory with --index NAME=PATH)")
    if default is None and len(specs) == 1:
        default = next(iter(specs))
    return list(specs.values()), default


# -- the registry ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReloadResult:
    previous_version: str
    version: str
    load_seconds: float


@dataclass(eq=False)
class Collection:
    name: str
    path: Path
    shards: tuple[str, ...] = ()
    status: str = LOADING
    searcher: Searcher | None = None
    error: str = ""


@dataclass(frozen=True)
class Loaders:
    """What the registry needs from the server: `load(path, shards)` loads, checks and warms a searcher (a router
    over `shards` when there are any; runs on `executor`); `changed(names)` publishes the state of those collections
    and aliases (health); `swapped(name, old, new)` runs after a collection's searcher changed (new None: deleted),
    for the caches."""

    load: Callable[[Path, tuple[str, ...]], Searcher]
    executor: Executor
    changed: Callable[[list[str]], Awaitable[None]]
    swapped: Callable[[str, Searcher | None, Searcher | None], None]


@dataclass
class Collections:
    """The registry: collection name -> its state and searcher, alias -> collection, and the default name. Read and
    changed on the event loop only."""

    specs: list[Spec]
    default: str | None
    root: Path  # the index root: reload paths stay inside it, aliases persist in it
    metrics: Metrics
    loaders: Loaders
    collections: dict[str, Collection] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for spec in self.specs:
            self.collections[spec.name] = Collection(spec.name, spec.path, spec.shards)
        self._admin = asyncio.Lock()
        self.aliases = self._persisted_aliases()
        if self.default is not None and self.default not in self.collections and self.default not in self.aliases:
            raise ValueError(f"default_collection: {self.default!r} is neither a collection nor an alias")

    def _persisted_aliases(self) -> dict[str, str]:
        aliases = {}
        for alias, target in read_aliases(self.root).items():
            if alias in self.collections:
                log.warning("%s: alias %r is ignored: a collection has that name", self.root / ALIASES_FILE, alias)
            elif target not in self.collections:
                log.warning("%s: alias %r is ignored: it names %r, which this server does not serve",
                            self.root / ALIASES_FILE, alias, target)
            else:
                aliases[alias] = target
        return aliases

    # -- resolving -----------------------------------------------------------------------------------------------------
    def resolve(self, name: str, field_name: str = "collection") -> Collection:
        """The collection `name` means: itself, the one an alias names, or for "" the default one."""
        if not name:
            if self.default is None:
                raise InvalidArgument(field_name, "this server has no default collection; name one of "
                                      + ", ".join(sorted(self.collections)[:20]))
            name = self.default
        target = self.aliases.get(name, name)
        found = self.collections.get(target)
        if found is None:
            raise NotFound(field_name, f"no collection or alias named {name[:200]!r}")
        return found

    def searcher(self, name: str, field_name: str = "collection") -> Searcher:
        """The searcher serving collection or alias `name` now."""
        found = self.resolve(name, field_name)
        if found.searcher is not None:  # a reload keeps the serving version while it loads
            return found.searcher
        if found.status == FAILED:
            raise FailedPrecondition(f"{field_name}: collection {found.name!r} failed to load: {found.error}")
        raise Unavailable(f"collection {found.name!r} is still loading; retry when health reports SERVING")

    def serving(self, collection: str) -> Searcher | None:
        """What serves collection `collection` (a name, not an alias) now; None once it is deleted or not loaded."""
        found = self.collections.get(collection)
        return None if found is None else found.searcher

    def default_collection(self) -> Collection | None:
        if self.default is None:
            return None
        target = self.aliases.get(self.default, self.default)
        return self.collections.get(target)

    def aliases_of(self, collection: str) -> list[str]:
        return sorted(a for a, target in self.aliases.items() if target == collection)

    def names_of(self, collection: str) -> list[str]:
        """The collection's name and its aliases: the health services its state shows in."""
        return [collection, *self.aliases_of(collection)]

    def loaded(self) -> bool:
        """Every collection has finished loading (serving or failed) and at least one serves."""
        states = [c.status for c in self.collections.values()]
        return LOADING not in states and SERVING in states

    # -- loading -------------------------------------------------------------------------------------------------------
    async def _load(self, path: Path, shards: tuple[str, ...], executor: Executor | None = None) -> Searcher:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor or self.loaders.executor, self.loaders.load, path, shards)

    async def load_all(self) -> None:
        """Loads every collection not loaded yet, one at a time (each uses the cores), publishing each as it ends.
        Raises only when none could be loaded: a server with nothing to serve should not start."""
        errors = []
        for entry in list(self.collections.values()):
            if entry.status != LOADING:
                continue
            started = time.perf_counter()
            try:
                searcher = await self._load(entry.path, entry.shards)
            except Exception as error:  # noqa: BLE001 - one collection's failure must not stop the others
                entry.status, entry.error = FAILED, _describe(error, entry.path)
                errors.append(error)
                log.error("collection %s (%s) failed to load: %s", entry.name, entry.path, entry.error)
            else:
                self._install(entry, searcher)
                log.info("collection %s: serving %s after %.1f s", entry.name, searcher.version,
                         time.perf_counter() - started)
            await self.loaders.changed(self.names_of(entry.name))
        if errors and not any(c.status == SERVING for c in self.collections.values()):
            raise errors[0]

    def _install(self, entry: Collection, searcher: Searcher) -> Searcher | None:
        searcher.collection = entry.name
        old, entry.searcher, entry.status, entry.error = entry.searcher, searcher, SERVING, ""
        self.loaders.swapped(entry.name, old, searcher)
        return old

    def replace(self, name: str, searcher: Searcher) -> None:
        """Serves `searcher` as collection `name` at once (tests put a slowed searcher in place this way)."""
        entry = self.collections[name]
        searcher.collection = name
        entry.searcher, entry.status, entry.error = searcher, SERVING, ""

    async def reload(self, name: str, path: str, confine: Callable[[str], Path], reload_executor: Executor,
                     shards: tuple[str, ...] = ()) -> ReloadResult:
        """Loads the index at `path` (inside the index root; "" = the collection's own path, CURRENT followed anew)
        beside what collection `name` serves ("" = the default), validates and warms it, then swaps it in. A name the
        server does not serve yet, naming a folder of the index root, is loaded as a new collection (a router over
        `shards` when given). A failure
        leaves the serving version in place and raises."""
        async with self._admin:
            if name:
                check_name(name, "collection")
                if name in self.aliases:
                    raise InvalidArgument("collection", f"{name!r} is an alias (of {self.aliases[name]!r}); reload "
                                          "the collection it names")
            entry = self.collections.get(name) if name else self.default_collection()
            if entry is None and not name:
                raise InvalidArgument("collection", "this server has no default collection; name one")
            new = entry is None
            if entry is None:
                target = confine(path or name)
                entry = Collection(name, target, shards)
            else:
                target = confine(path) if path else entry.path
            current = entry.searcher
            started = time.perf_counter()
            try:
                searcher = await self._load(target, entry.shards, reload_executor)
            except Exception as error:
                self.metrics.reloads.labels("failed").inc()
                if isinstance(error, OSError):  # unreadable path or file: a bad index, not a server fault
                    error = IndexFormatError(f"{str(target)[:300]}: cannot be read: {error.strerror or error}")
                log.error("reload of %s as collection %s failed, still serving %s: %s", target, entry.name,
                          current.version if current is not None else "nothing", error)
                raise error from None
            seconds = time.perf_counter() - started
            if new:
                self.collections[entry.name] = entry
            # One reference assignment: a request reads the searcher once, so it runs wholly on one index.
            self._install(entry, searcher)
            self.metrics.reloads.labels("ok").inc()
            previous = current.version if current is not None else ""
            log.info("reloaded collection %s: serving %s version %s (was %s) after %.2f s", entry.name, target,
                     searcher.version, previous, seconds)
            await self.loaders.changed(self.names_of(entry.name))
            return ReloadResult(previous_version=previous, version=searcher.version, load_seconds=seconds)

    async def refresh(self, specs: list[Spec], confine: Callable[[str], Path], reload_executor: Executor) -> None:
        """SIGHUP: collections of `specs` not served yet are loaded, the aliases file is read anew (so an alias may
        name one of them: `rag-index build` + `rag-index alias` + SIGHUP switches with no RPC), and every collection
        whose CURRENT moved is reloaded. One that fails keeps serving what it served (the reload logged why)."""
        new = [spec for spec in specs if spec.name not in self.collections]
        for spec in new:
            with contextlib.suppress(Exception):
                await self.reload(spec.name, str(spec.path.resolve()), confine, reload_executor, spec.shards)
        await self.reread_aliases()
        fresh = {spec.name for spec in new}
        for name, entry in list(self.collections.items()):
            if name in fresh:
                continue
            try:
                moved = entry.searcher is None or \
                    Path(entry.searcher.summary().path).resolve() != resolve_version_dir(entry.path).resolve()
            except (OSError, IndexFormatError):
                moved = True  # the reload says what is wrong
            if moved:
                with contextlib.suppress(Exception):
                    await self.reload(name, "", confine, reload_executor)

    # -- aliases and deletes -------------------------------------------------------------------------------------------
    async def set_alias(self, alias: str, collection: str) -> str:
        """Points `alias` at `collection` (persisted first); returns the collection it named before ("" if new)."""
        async with self._admin:
            check_name(alias, "alias")
            check_name(collection, "collection")
            if alias in self.collections:
                raise InvalidArgument("alias", f"{alias!r} is a collection; an alias needs a name of its own")
            if collection in self.aliases:
                raise InvalidArgument("collection", f"{collection!r} is an alias; point {alias!r} at the "
                                      f"collection it names ({self.aliases[collection]!r})")
            target = self.collections.get(collection)
            if target is None:
                raise NotFound("collection", f"no collection named {collection!r}")
            if target.status != SERVING:
                raise FailedPrecondition(f"collection: {collection!r} is {target.status}, not SERVING; an alias "
                                         "moves only to a collection that serves")
            previous = self.aliases.get(alias, "")
            await self._persist(lambda aliases: aliases.__setitem__(alias, collection))
            self.aliases[alias] = collection  # the swap: later requests resolve to the new target
            log.info("alias %s -> %s (was %s)", alias, collection, previous or "new")
            await self.loaders.changed([alias])
            return previous

    async def delete_alias(self, alias: str) -> str:
        async with self._admin:
            check_name(alias, "alias")
            previous = self.aliases.get(alias)
            if previous is None:
                raise NotFound("alias", f"no alias named {alias!r}")
            if alias == self.default:
                raise FailedPrecondition(f"alias: {alias!r} is the default collection; it cannot be removed")
            await self._persist(lambda aliases: aliases.pop(alias, None))
            del self.aliases[alias]
            log.info("alias %s removed (was %s)", alias, previous)
            await self.loaders.changed([alias])
            return previous

    async def delete(self, name: str, remove_files: bool, confine: Callable[[str], Path]) -> str:
        """Stops serving collection `name`; with `remove_files` also deletes its folder (inside the index root).
        Refused while an alias names it or while it is the default. Returns the version it served."""
        async with self._admin:
            check_name(name, "collection")
            if name in self.aliases:
                raise InvalidArgument("collection", f"{name!r} is an alias; delete it with DeleteAlias")
            entry = self.collections.get(name)
            if entry is None:
                raise NotFound("collection", f"no collection named {name!r}")
            aliases = self.aliases_of(name)
            if aliases:
                raise FailedPrecondition(f"collection: {name!r} is named by alias(es) {', '.join(aliases)}; move or "
                                         "delete them first")
            if name == self.default:
                raise FailedPrecondition(f"collection: {name!r} is the default collection")
            folder = confine(str(entry.path.resolve())) if remove_files else None
            del self.collections[name]
            self.loaders.swapped(name, entry.searcher, None)
            version = entry.searcher.version if entry.searcher is not None else ""
            if folder is not None:
                # Requests still running on it keep its memory-mapped files: unlinked files stay readable.
                await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, folder)
            log.info("collection %s deleted (version %s)%s", name, version, f", {folder} removed" if folder else "")
            await self.loaders.changed([name])
            return version

    async def reread_aliases(self) -> None:
        """Takes the aliases file as it is now (`rag-index alias` changed it)."""
        async with self._admin:
            before = dict(self.aliases)
            self.aliases = self._persisted_aliases()
            changed = sorted(set(before) ^ set(self.aliases) | {a for a in before if before[a] != self.aliases.get(a)})
            if changed:
                log.info("aliases reread: %s", ", ".join(f"{a} -> {self.aliases.get(a, '(removed)')}"
                                                         for a in changed))
                await self.loaders.changed(changed)

    async def _persist(self, change: Callable[[dict[str, str]], object]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, update_aliases, self.root, change)
        except OSError as error:
            raise FailedPrecondition(f"the aliases file in {self.root} cannot be written: "
                                     f"{error.strerror or error}") from None


def _describe(error: Exception, path: Path) -> str:
    if isinstance(error, OSError):
        return f"{str(path)[:300]}: cannot be read: {error.strerror or error}"
    return str(error) or type(error).__name__
