"""Shared test fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Child processes (`python -m rag_service...`) must import the installed package, not the source tree in the working
# directory, which has no compiled extension (Python 3.11+ honours this).
os.environ.setdefault("PYTHONSAFEPATH", "1")

# ======================================================================================================================
# Index build fixtures (rag-index build: encoder, corpus files). Owned by the index build; add other fixtures below.
# ======================================================================================================================


def _wait_for(condition: Callable[[], object], timeout: float = 30.0) -> bool:
    """Polls `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., bool]:
    """`wait_for(condition, timeout=30.0)`: polls until the condition holds; False when it never did."""
    return _wait_for


@pytest.fixture(scope="session")
def encoder():
    """One Encoder for the whole session: loading the model takes seconds."""
    from rag_service.encoder.encode import Encoder

    return Encoder()


def _write_corpus(path: Path, docs: Iterable[Mapping[str, Any]]) -> Path:
    """Writes `docs` (dicts with `_id`, `text`, optional `title` and `metadata`) as a BEIR corpus.jsonl."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(dict(doc), ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def write_corpus() -> Callable[[Path, Iterable[Mapping[str, Any]]], Path]:
    """`write_corpus(path, docs) -> path`: a small BEIR corpus.jsonl (a fixture because tests import with importlib
    mode, so they cannot import helpers from conftest)."""
    return _write_corpus


@pytest.fixture
def ext():
    """The compiled extension. Missing is a failure, not a skip: CI builds it, so its absence is a broken build."""
    try:
        from rag_service import _native
    except ImportError as error:
        pytest.fail(f"rag_service._native is not built ({error!r}); build it with "
                    "`python setup.py build_ext --inplace` or `pip install .`")
    return _native


# ======================================================================================================================
# End of index build fixtures.
# ======================================================================================================================


# ---------------------------------------------------------------------------------------------------------------------
# Served index fixtures: a small corpus built by the real build code and served by a real server on a free port.
# ---------------------------------------------------------------------------------------------------------------------

GLACIER_TEXT = " ".join([
    "A glacier is a persistent body of dense ice that is constantly moving under its own weight.",
    "Glaciers form where the accumulation of snow exceeds its ablation over many years, often centuries.",
    "As the ice sheet flows it erodes rock and carries debris, leaving moraines, drumlins and eskers behind.",
    "Valley glaciers carve U-shaped valleys, and when they retreat they leave lakes dammed by terminal moraine.",
    "Ice cores drilled from glaciers record past climate, trapping bubbles of ancient air for hundreds of millennia.",
    "Today most mountain glaciers are retreating, and their meltwater feeds rivers that millions of people rely on.",
])

SERVER_DOCS = [
    ("volcano", "Volcanoes", "A volcano erupts when magma rises through the crust and lava, ash and gases escape "
     "through a vent.", {"topic": "geology", "year": 2001}),
    ("glacier", "Glaciers", GLACIER_TEXT, {"topic": "geology", "year": 1999}),
    ("earthquake", "Earthquakes", "Earthquakes are the shaking of the surface caused by a sudden slip on a fault, "
     "releasing stored elastic strain energy as seismic waves.", {"topic": "geology", "year": 2010}),
    ("photosynthesis", "Photosynthesis", "Green plants use chlorophyll to turn sunlight, water and carbon dioxide "
     "into sugar and oxygen in their leaves.", {"topic": "biology", "year": 2005}),
    ("dna", "DNA", "Deoxyribonucleic acid carries genetic instructions as a double helix of paired nucleotide bases.",
     {"topic": "biology", "year": 2003}),
    ("aqueduct", "Roman aqueducts", "The ancient Romans built aqueducts of stone arches that carried water by "
     "gravity from distant springs into their cities.", {"topic": "history", "year": 1980}),
    ("printing", "The printing press", "Gutenberg's movable type printing press spread books and literacy across "
     "Europe in the fifteenth century.", {"topic": "history", "year": 1985}),
    ("light", "Speed of light", "The speed of light in a vacuum is exactly 299,792,458 metres per second, a "
     "universal physical constant.", {"topic": "physics", "year": 2019}),
    ("gravity", "Gravity", "Gravity attracts masses to one another; Newton described it as a force and Einstein as "
     "the curvature of spacetime.", {"topic": "physics", "year": 2015}),
    ("bridge", "Suspension bridges", "A suspension bridge hangs its deck from vertical cables attached to main "
     "cables slung between towers, an engineering feat of the modern era.", {"topic": "engineering", "year": 1990}),
    ("coffee", "Coffee", "Coffee is brewed from roasted beans of the Coffea plant; caffeine makes it a stimulant.",
     {"topic": "food", "year": 2012}),
    ("bread", "Sourdough bread", "Sourdough is leavened by wild yeast and lactic acid bacteria in a fermented "
     "starter of flour and water.", {"topic": "food", "year": 2020}),
]


def write_server_corpus(path: Path) -> Path:
    return _write_corpus(path, ({"_id": i, "title": t, "text": x, "metadata": m} for i, t, x, m in SERVER_DOCS))


@dataclass
class ServedIndex:
    root: Path
    port: int
    n_docs: int
    n_chunks: int


class ServerThread:
    """Runs a RagServer on its own event loop in a background thread, so sync tests use ordinary channels.
    `server_args` go to create_server (tracer_provider=...)."""

    def __init__(self, config, encoder, **server_args) -> None:
        self.config, self.encoder, self.server_args = config, encoder, server_args
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        from rag_service.api.server import create_server

        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(create_server(self.config, encoder=self.encoder, **self.server_args),
                                                  self.loop)
        self.server, self.port = future.result(timeout=300)
        return self

    def settle(self) -> None:
        """Returns once the server's event loop has run every callback queued so far, such as the cache store of a
        miss whose reply the caller has received (it runs just after the reply goes out)."""
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(timeout=30)

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, encoder) -> Path:
    """Index root built from SERVER_DOCS with small chunks so the glacier document spans several."""
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("served")
    corpus = write_server_corpus(work / "corpus.jsonl")
    root = work / "testidx"
    build_index(corpus, root, BuildConfig(chunk_tokens=64, chunk_overlap=16), encoder=encoder, progress=False)
    return root


@pytest.fixture(scope="session")
def built_graph_index(tmp_path_factory, encoder) -> Path:
    """built_index's corpus and chunks, its dense rows searched by an HNSW graph as a large index's are."""
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("graph")
    corpus = write_server_corpus(work / "corpus.jsonl")
    root = work / "graphidx"
    build_index(corpus, root, BuildConfig(chunk_tokens=64, chunk_overlap=16, dense_index="hnsw"), encoder=encoder,
                progress=False)
    return root


@pytest.fixture(scope="session")
def server_thread():
    """`server_thread(config, encoder)`: a context manager running a RagServer in a background thread."""
    return ServerThread


@pytest.fixture(scope="session")
def served_index(built_index, encoder):
    from rag_service.core.config import ServerConfig
    from rag_service.index.load import load_index

    index = load_index(built_index)
    with ServerThread(ServerConfig(index=built_index, port=0, warmup_queries=2), encoder) as running:
        yield ServedIndex(root=built_index, port=running.port, n_docs=index.n_docs, n_chunks=index.n_chunks)


@pytest.fixture
def one_worker(built_index, encoder, server_thread):
    """A server with one pipeline thread and room for one queued request; `hold()` occupies the thread until `gate`
    is set. A request queued meanwhile waits as long as a test takes (max_queue_wait off: not refused for its wait)."""
    import grpc

    from rag_service.core.config import ServerConfig
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    config = ServerConfig(index=built_index, port=0, workers=1, max_queued=1, warmup_queries=0, max_queue_wait=0.0)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        stub.Search(pb.SearchRequest(query="warm up"), timeout=30)
        gate = threading.Event()

        def hold() -> None:
            running.server.executor.submit(gate.wait, 60)

        yield running, stub, hold, gate
        gate.set()


@pytest.fixture
def hold_next_search():
    """`hold_next_search(servicer)`: a block in which the servicer's next search, taken by a pipeline thread at once
    (its wait in the queue is not stale), is held on that thread until the block ends; it yields the Event set once
    that search is held. The searches after it run as usual."""

    @contextlib.contextmanager
    def hold(servicer):
        gate, entered = threading.Event(), threading.Event()
        original = servicer._timed_search

        def held(work, submitted_ns):
            servicer._timed_search = original  # the next search only

            def late():
                entered.set()
                gate.wait(60)
                return work()

            return original(late, submitted_ns)

        servicer._timed_search = held
        try:
            yield entered
        finally:
            servicer._timed_search = original
            gate.set()

    return hold
