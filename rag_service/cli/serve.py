"""`rag-serve`: serve an index over gRPC until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import click


async def _serve(config) -> None:
    from rag_service.server import RagServer

    server = RagServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(f"rag-serve: SERVING {config.index} on {config.host}:{server.port}", flush=True)
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
              help="TOML file with any ServerConfig field; RAG_* environment variables override it.")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(index, host, port, workers, config_file, log_level) -> None:
    """Serve a rag-service index over gRPC (Retriever, health, reflection)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from installed packages, never from a hub
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it narrates every SIMD variant it tries
    from pydantic import ValidationError

    from rag_service.config import load_config
    from rag_service.errors import RagError

    try:
        config = load_config(config_file, index=index, host=host, port=port, workers=workers)
    except (ValidationError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    try:
        asyncio.run(_serve(config))
    except (RagError, OSError) as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":
    main()
