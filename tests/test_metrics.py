"""The per-stage histogram exposes what prometheus_client's labelled Histogram exposes for the same observations."""

from __future__ import annotations

import random
import re
import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rag_service.core.metrics import STAGE_BUCKETS, Metrics, StageHistogram

CREATED = re.compile(r"^rag_stage_seconds_created\{.*$", re.MULTILINE)


def exposition(registry: CollectorRegistry) -> tuple[str, list[str]]:
    """The text with the creation times blanked (they differ by when each was made), and the created lines."""
    text = generate_latest(registry).decode()
    return CREATED.sub("created", text), CREATED.findall(text)


def test_stage_histogram_exposes_what_the_client_histogram_exposes():
    rng = random.Random(3)
    reference_registry, registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("rag_stage_seconds", "Time per pipeline stage", ["stage"], buckets=STAGE_BUCKETS,
                          registry=reference_registry)
    ours = StageHistogram("rag_stage_seconds", "Time per pipeline stage", STAGE_BUCKETS, registry)
    # Every bound exactly (le is inclusive), either side of it, zero, and past the last bound.
    values = [0, 1, 3_000_000] + [int(b * 1e6) + d for b in STAGE_BUCKETS for d in (-1, 0, 1)]
    values += [rng.randint(0, 3_000_000) for _ in range(300)]
    for us in values:
        stages = {"encode": us, "dense": us // 7, "rerank": us % 1000}
        for stage, value in stages.items():
            reference.labels(stage).observe(value / 1e6)
        ours.observe_us(stages)
    expected, expected_created = exposition(reference_registry)
    got, got_created = exposition(registry)
    assert got == expected
    assert [line.split("}")[0] for line in got_created] == [line.split("}")[0] for line in expected_created]


def test_stage_histogram_counts_every_observation_from_many_threads():
    metrics = Metrics()
    stages = {"encode": 4000, "dense": 250, "rerank": 300}

    def observe() -> None:
        for _ in range(500):
            metrics.observe_stages(stages)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = {(s.name, s.labels.get("stage")): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for s in family.samples}
    for stage, us in stages.items():
        assert samples[("rag_stage_seconds_count", stage)] == 2000
        assert samples[("rag_stage_seconds_sum", stage)] == pytest.approx(2000 * us / 1e6)
