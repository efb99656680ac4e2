"""`rag-serve`: serve indexes over gRPC until SIGTERM/SIGINT, then drain and exit 0; SIGHUP rereads the aliases and
reloads every collection."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import click


async def _serve(config) -> None:
    from rag_service.api.server import RagServer

    log = logging.getLogger("rag_service")
    server = RagServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    async def reload() -> None:
        try:
            await server.reload_all()
        except Exception as error:  # noqa: BLE001 - a failed reload keeps serving; reload() logged why
            log.warning("SIGHUP reload failed: %s", error)

    def on_hup() -> None:
        log.info("SIGHUP: rereading the aliases, reloading every collection")
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await server.start()
        metrics = f"; metrics on http://{config.metrics.host}:{server.metrics_port}/metrics" \
            if server.metrics_port is not None else ""
        role = f" as router over {len(config.router.shards)} shards" if config.router.shards else \
            f" routing {', '.join(config.router.collections)} to their shards" if config.router.collections else ""
        registry = server.collections
        default = registry.default_collection()
        served = ", ".join(f"{name}{' (default)' if default is not None and default.name == name else ''}"
                           for name, c in registry.collections.items() if c.status == "SERVING")
        served += "".join(f"; alias {alias} -> {target}" for alias, target in sorted(registry.aliases.items()))
        failed = [name for name, c in registry.collections.items() if c.status == "FAILED"]
        what = f"{config.index}" if list(registry.collections) == [registry.default] else \
            f"collections {served}" + (f" (failed: {', '.join(failed)})" if failed else "")
        print(f"rag-serve: SERVING {what}{role} on {config.host}:{server.port}{metrics}", flush=True)
        await stop.wait()
        logging.getLogger("rag_service").info("signal received: draining (grace %.1f s)", config.grace_seconds)
    finally:
        await server.stop()


def _index_options(values: tuple[str, ...]) -> tuple[Path | None, dict[str, Path]]:
    """--index values: at most one plain PATH (the default collection) and NAME=PATH pairs."""
    from rag_service.core.config import COLLECTION_NAME

    plain: list[Path] = []
    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and COLLECTION_NAME.fullmatch(name) and path:
            if name in named:
                raise click.BadParameter(f"collection {name!r} given twice", param_hint="--index")
            named[name] = Path(path)
        else:
            plain.append(Path(value))
    if len(plain) > 1:
        raise click.BadParameter("give one plain PATH (the default collection); name the others NAME=PATH",
                                 param_hint="--index")
    return (plain[0] if plain else None), named


def _shard_options(values: tuple[str, ...]) -> tuple[list[str] | None, dict[str, list[str]]]:
    """--shards values: HOST:PORT,... for the plain --index (router.shards), NAME=HOST:PORT,... for collection NAME
    (router.collections)."""
    from rag_service.core.config import COLLECTION_NAME

    plain: list[str] | None = None
    routed: dict[str, list[str]] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        named = bool(sep) and COLLECTION_NAME.fullmatch(name) is not None
        addresses = [a.strip() for a in (rest if named else value).split(",") if a.strip()]
        if not addresses:
            raise click.BadParameter("give at least one HOST:PORT", param_hint="--shards")
        if named:
            routed[name] = addresses
        elif plain is not None:
            raise click.BadParameter("give one plain list (the --index router); name the others NAME=...",
                                     param_hint="--shards")
        else:
            plain = addresses
    return plain, routed


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--index", "indexes", multiple=True, metavar="[NAME=]PATH",
              help="An index root (with CURRENT) or version directory. NAME=PATH serves it as collection NAME "
              "(repeatable); a plain PATH is the default collection, named by its manifest.")
@click.option("--index-root", type=click.Path(path_type=Path, file_okay=False),
              help="collections_root: serve every index under this directory as a collection named by its folder, "
              "with the aliases of its aliases.json.")
@click.option("--default-collection", help="default_collection: the collection or alias that answers requests "
              "without one.")
@click.option("--host", help="Address to bind [default: 127.0.0.1; 0.0.0.0 or [::] for all].")
@click.option("--port", type=int, help="Port to bind; 0 picks a free one [default: 50051].")
@click.option("--workers", type=int, help="Pipeline threads [default: 2].")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML file with any setting (server.example.toml lists them); RAG_* environment variables "
              "override it.")
@click.option("--metrics-port", type=int, help="metrics.port: serve Prometheus metrics on this port at /metrics (0: a "
              "free one).")
@click.option("--shards", multiple=True, metavar="[NAME=]HOST:PORT,...",
              help="router.shards: the router role, comma-separated shard server addresses (HOST:PORT), "
              "one per shard of the set; --index is then the router directory of the sharded build (OUT/router).")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", default="json", type=click.Choice(["json", "text"]),
              help="json: one JSON object per line (one per request at INFO).")
@click.option("--print-config", is_flag=True, help="Print the effective configuration (file, environment and flags "
              "applied; secrets masked) as TOML and exit without loading anything.")
def main(indexes, index_root, default_collection, host, port, workers, config_file, metrics_port, shards, log_level,
         log_format, print_config) -> None:
    """Serve rag-service indexes over gRPC (Retriever, health, reflection): one, or many as named collections.

    Tokens and TLS files come from the environment (RAG_AUTH__ADMIN_TOKEN, RAG_AUTH__SEARCH_TOKEN,
    RAG_AUTH__ADMIN_TOKEN_FILE, RAG_TLS__CERT_FILE, ...) or the --config file, never from the command line.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from installed packages, never from a hub
    from rag_service.api.logs import configure_logging

    configure_logging(log_level, log_format)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it narrates every SIMD variant it tries
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from rag_service.core.config import load_config, to_toml
    from rag_service.core.errors import RagError

    try:
        shard_list, routed = _shard_options(shards)
        index, named = _index_options(indexes)
        config = load_config(config_file, index=index, collections=named or None, collections_root=index_root,
                             default_collection=default_collection, host=host, port=port, workers=workers,
                             metrics={"port": metrics_port},
                             router={"shards": shard_list, "collections": routed or None})
    except (ValidationError, SettingsError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    if print_config:
        click.echo(to_toml(config), nl=False)
        return
    try:
        if config.event_loop == "uvloop":
            try:
                import uvloop
            except ImportError as error:
                raise click.ClickException("event_loop = 'uvloop' needs the uvloop package "
                                           "(pip install 'rag-service[uvloop]')") from error
            uvloop.run(_serve(config))
        else:
            asyncio.run(_serve(config))
    except (RagError, OSError, ValueError) as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":
    main()
