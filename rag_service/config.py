"""Server configuration: defaults < TOML config file < environment (RAG_*) < command line.

The search defaults are the settings that scored best on SciFact's train split (bench/tune_fusion.py; the table is in
bench/README.md): change them only with a new measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class SearchDefaults(BaseModel):
    # SciFact train (809 queries): weighted, depth 100, w 0.5 gave nDCG@10 0.7388, the best of the grid in
    # bench/README.md; for RRF requests k = 10 beat 20, 30 and 60.
    top_k: int = Field(10, ge=1)
    depth: int = Field(100, ge=1)
    fusion: Literal["rrf", "weighted"] = "weighted"
    dense_weight: float = Field(0.5, ge=0.0, le=1.0)
    rrf_k: float = Field(10.0, gt=0.0)
    # Second stage (issue: native reranker and context filter); set by measurement in bench/README.md.
    rerank: bool = True
    rerank_depth: int = Field(100, ge=1)
    mmr_lambda: float = Field(1.0, ge=0.0, le=1.0)
    dedup_threshold: float = Field(1.0, gt=0.0, le=1.0)
    max_context_tokens: int = Field(0, ge=0)


class Limits(BaseModel):
    """The request contract: values outside these get INVALID_ARGUMENT naming the field."""

    max_query_chars: int = Field(4096, ge=1)
    max_top_k: int = Field(1000, ge=100)
    max_depth: int = Field(2000, ge=100)
    max_filters: int = Field(16, ge=0)
    max_filter_value_chars: int = Field(1024, ge=1)
    max_rerank_depth: int = Field(2000, ge=100)
    max_context_tokens: int = Field(1_000_000, ge=1)
    max_budget_ms: int = Field(600_000, ge=1)


class ServerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", env_nested_delimiter="__", extra="forbid")

    index: Path = Field(Path("indexes/demo"), description="index root (with CURRENT) or a version directory")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # Threads that run the CPU-bound pipeline off the event loop; one per core is the measured sweet spot.
    workers: int = Field(2, ge=1)
    # Admission control: requests beyond this many in flight are refused at once with RESOURCE_EXHAUSTED.
    max_in_flight: int = Field(64, ge=1)
    grace_seconds: float = Field(10.0, ge=0.0)
    verify_checksums: bool = True
    warmup_queries: int = Field(8, ge=0)
    model_path: str | None = None
    max_message_bytes: int = Field(1 << 20, ge=1024)
    defaults: SearchDefaults = SearchDefaults()
    limits: Limits = Limits()

    # Set on a per-file subclass by load_config; read when pydantic-settings builds its sources.
    config_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = cls.config_file
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_config(config_file: Path | None = None, **overrides: Any) -> ServerConfig:
    """Build the configuration; `overrides` (command-line values) win, None values are ignored."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return ServerConfig(**given)
    if not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    # A subclass per file keeps the file choice out of global state.
    bound = type("FileServerConfig", (ServerConfig,), {"config_file": Path(config_file)})
    return bound(**given)
