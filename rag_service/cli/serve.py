"""`rag-serve`: serve an index over gRPC until SIGTERM/SIGINT, then drain and exit 0; SIGHUP reloads the index."""

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
            await server.reload()
        except Exception as error:  # noqa: BLE001 - a failed reload keeps serving; reload() logged why
            log.warning("SIGHUP reload failed: %s", error)

    def on_hup() -> None:
        log.info("SIGHUP: reloading %s", config.index)
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await server.start()
        metrics = f"; metrics on http://{config.metrics.host}:{server.metrics_port}/metrics" \
            if server.metrics_port is not None else ""
        role = f" as router over {len(config.router.shards)} shards" if config.router.shards else ""
        print(f"rag-serve: SERVING {config.index}{role} on {config.host}:{server.port}{metrics}", flush=True)
        await stop.wait()
        logging.getLogger("rag_service").info("signal received: draining (grace %.1f s)", config.grace_seconds)
    finally:
        await server.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--index", type=click.Path(path_type=Path), help="Index root (with CURRENT) or version directory.")
@click.option("--host", help="Address to bind [default: 127.0.0.1; 0.0.0.0 or [::] for all].")
@click.option("--port", type=int, help="Port to bind; 0 picks a free one [default: 50051].")
@click.option("--workers", type=int, help="Pipeline threads [default: 2].")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML file with any setting (server.example.toml lists them); RAG_* environment variables "
              "override it.")
@click.option("--metrics-port", type=int, help="metrics.port: serve Prometheus metrics on this port at /metrics (0: a "
              "free one).")
@click.option("--shards", help="router.shards: the router role, comma-separated shard server addresses (HOST:PORT), "
              "one per shard of the set; --index is then the router directory of the sharded build (OUT/router).")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", default="json", type=click.Choice(["json", "text"]),
              help="json: one JSON object per line (one per request at INFO).")
@click.option("--print-config", is_flag=True, help="Print the effective configuration (file, environment and flags "
              "applied; secrets masked) as TOML and exit without loading anything.")
def main(index, host, port, workers, config_file, metrics_port, shards, log_level, log_format,
         print_config) -> None:
    """Serve a rag-service index over gRPC (Retriever, health, reflection).

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
        shard_list = None if shards is None else [a.strip() for a in shards.split(",") if a.strip()]
        if shard_list is not None and not shard_list:
            raise click.BadParameter("give at least one HOST:PORT", param_hint="--shards")
        config = load_config(config_file, index=index, host=host, port=port, workers=workers,
                             metrics={"port": metrics_port}, router={"shards": shard_list})
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
