"""The configuration: every setting described, the committed example current and loadable, sections in TOML and in
the environment, settings that moved refused with their new name, and `rag-serve --print-config`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from rag_service.core.config import (
    AdaptiveSettings,
    ServerConfig,
    env_name,
    example_toml,
    load_config,
    settings,
    to_toml,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "server.example.toml"


@pytest.fixture(autouse=True)
def _no_rag_environment(monkeypatch):
    """The defaults under test, not whatever the shell running the tests has set."""
    for name in [n for n in os.environ if n.startswith("RAG_")]:
        monkeypatch.delenv(name)


def _defaults() -> dict:
    return ServerConfig.model_construct().model_dump()


def test_every_setting_and_section_is_described():
    names = dict(settings())
    assert {"workers", "adaptive.brownout", "encoder.micro_batch_ms", "cache.ttl_seconds"} <= set(names)
    undescribed = [name for name, field in names.items() if not (field.description or "").strip()]
    assert undescribed == []
    sections = {type(value) for value in ServerConfig.model_construct().__dict__.values()
                if isinstance(value, BaseModel)}
    assert len(sections) >= 8
    assert [s.__name__ for s in sections if not (s.__doc__ or "").strip()] == []


def test_the_committed_example_is_current():
    # Regenerate with: python -m rag_service.core.config > server.example.toml
    assert EXAMPLE.read_text(encoding="utf-8") == example_toml()


def test_the_example_ignores_the_environment(monkeypatch):
    monkeypatch.setenv("RAG_WORKERS", "7")
    assert example_toml() == EXAMPLE.read_text(encoding="utf-8")
    assert load_config().workers == 7


def test_the_example_loads_to_the_defaults():
    config = load_config(EXAMPLE)
    assert config.model_dump() == _defaults()


def test_the_example_lists_every_setting_with_its_description():
    text = EXAMPLE.read_text(encoding="utf-8")
    listed: set[str] = set()
    table = ""
    for line in text.splitlines():
        if header := re.fullmatch(r"\[([a-z_.]+)\]", line):
            table = header.group(1) + "."
            listed.add(header.group(1))
        elif key := re.match(r"(?:# )?([a-z_]+) = ", line):
            listed.add(table + key.group(1))
    assert listed == {name for name, _ in settings()}
    prose = " ".join(line.removeprefix("# ") for line in text.splitlines())
    for name, field in settings():
        if not any(other.startswith(name + ".") for other, _ in settings()):  # a setting, not a section
            assert " ".join(field.description.split()[:4]) in prose, name
    # Settings without a default (TOML has no null) are shown commented out, so the file still loads.
    assert "# model_path = (not set)" in text and "# admin_token = (not set)" in text


def test_sections_in_the_environment_and_in_a_file(tmp_path, monkeypatch):
    from rag_service.search.adaptive import AdaptiveConfig

    monkeypatch.setenv("RAG_ADAPTIVE__BROWNOUT", "0")
    monkeypatch.setenv("RAG_ENCODER__MICRO_BATCH_MS", "2")
    (tmp_path / "server.toml").write_text('workers = 3\n[adaptive]\nbrownout = true\nbrownout_target = 0.4\n'
                                          '[metrics]\nport = 9100\n')
    config = load_config(tmp_path / "server.toml", metrics={"port": None}, router={"shards": ["a:1"]})
    # The environment beats the file, a flag beats both, and an unset flag (None) leaves the rest alone.
    assert config.adaptive.brownout is False and config.adaptive.brownout_target == 0.4 and config.workers == 3
    assert config.encoder.micro_batch_ms == 2.0 and config.metrics.port == 9100 and config.router.shards == ["a:1"]
    policy = AdaptiveConfig(**config.adaptive.model_dump())
    assert (policy.brownout, policy.brownout_target, policy.enabled) == (False, 0.4, True)
    assert env_name("adaptive.brownout") == "RAG_ADAPTIVE__BROWNOUT"


def test_adaptive_settings_map_onto_the_policy_config_with_the_same_defaults():
    from rag_service.search.adaptive import AdaptiveConfig

    assert AdaptiveConfig(**AdaptiveSettings().model_dump()) == AdaptiveConfig()
    assert set(AdaptiveSettings.model_fields) <= {f.name for f in dataclasses.fields(AdaptiveConfig)}


def test_moved_settings_are_refused_with_their_new_name(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_ADAPTIVE_BROWNOUT", "0")
    with pytest.raises(ValidationError, match="RAG_ADAPTIVE_BROWNOUT is now RAG_ADAPTIVE__BROWNOUT"):
        load_config()
    monkeypatch.delenv("RAG_ADAPTIVE_BROWNOUT")
    for value in ("false", "0"):
        monkeypatch.setenv("RAG_ADAPTIVE", value)
        with pytest.raises(ValidationError, match=r"adaptive\.enabled \(RAG_ADAPTIVE__ENABLED\)"):
            load_config()
    monkeypatch.delenv("RAG_ADAPTIVE")
    (tmp_path / "old.toml").write_text("metrics_port = 9100\n")
    with pytest.raises(ValidationError, match="metrics_port is now metrics.port"):
        load_config(tmp_path / "old.toml")
    with pytest.raises(ValidationError, match="tls.cert_file and tls.key_file"):
        load_config(tls={"cert_file": tmp_path / "c"})


def test_print_config_shows_the_effective_values_with_secrets_masked(tmp_path):
    (tmp_path / "server.toml").write_text('workers = 3\n[cache]\nttl_seconds = 5.0\n[auth]\nadmin_token = "adm1n"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env.update(HF_HUB_OFFLINE="1", RAG_WORKERS="7", RAG_AUTH__SEARCH_TOKEN="s3cret", RAG_ADAPTIVE__BROWNOUT="0")
    # The index does not exist: --print-config loads nothing.
    done = subprocess.run([sys.executable, "-m", "rag_service.cli.serve", "--config", str(tmp_path / "server.toml"),
                           "--index", str(tmp_path / "missing"), "--port", "1234", "--metrics-port", "9100",
                           "--shards", "a:1,b:2", "--print-config"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout and "adm1n" not in done.stdout
    assert "# model_path = (not set)" in done.stdout
    (tmp_path / "printed.toml").write_text(done.stdout)
    shown = load_config(tmp_path / "printed.toml")  # what it prints is itself a configuration
    assert shown.auth.search_token.get_secret_value() == shown.auth.admin_token.get_secret_value() == "**********"
    assert (shown.workers, shown.port, shown.index) == (7, 1234, tmp_path / "missing")
    assert shown.adaptive.brownout is False and shown.cache.ttl_seconds == 5.0
    assert shown.metrics.port == 9100 and shown.router.shards == ["a:1", "b:2"]


def test_print_config_output_loads_back_to_the_same_configuration(tmp_path):
    config = load_config(workers=5, adaptive={"lexical": False}, router={"shards": ["h:1"]}, replica_name="r-1")
    (tmp_path / "printed.toml").write_text(to_toml(config))
    assert load_config(tmp_path / "printed.toml").model_dump() == config.model_dump()

