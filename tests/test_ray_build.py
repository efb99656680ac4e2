"""rag-index build --ray: chunking and encoding on a (local) Ray cluster write the same index, byte for byte."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rag_service.cli.index import cli
from rag_service.core.errors import BuildError
from rag_service.index.build import BuildConfig, build_index
from rag_service.index.ray_build import RayBuild, RayOptions, build_index_on_ray, import_ray

pytestmark = pytest.mark.slow

SENTENCES = [
    "Glaciers carve U-shaped valleys and leave moraines behind when they retreat.",
    "Ice cores record past climate in bubbles of ancient air.",
    "A volcano erupts when magma rises through the crust.",
    "Lava, ash and gases escape through the vent; pyroclastic flows follow.",
    "Tea is steeped from the leaves of Camellia sinensis.",
    "Iron rusts when oxygen and water oxidise it to iron oxide!",
    "Is the kite held by a string from the ground?",
    "Übergrößen: naïve café owners sell crème brûlée in Zürich.",
]


def _corpus() -> list[dict]:
    """Short and long documents (one chunk, many overlapping chunks), titles and none, repeated sentences (windows
    shared between chunks), non-ASCII text: every path of chunking and window deduplication."""
    docs = []
    for i in range(36):
        n = 1 + (i * 7) % 17
        text = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(n))
        docs.append({"_id": f"d{i}", "title": "" if i % 5 == 0 else f"Topic {i % 4}: {SENTENCES[i % 3][:30]}",
                     "text": text})
    return docs


# Small chunks and batches: many chunks per document and many encoder batches, so that a batch planned differently
# on the cluster would change some vector's last bits. The build's default document encoder: torch in bf16 on a CPU
# with AMX, ONNX int8 elsewhere; either way the cluster must reproduce the single build's bytes.
CONFIG = BuildConfig(chunk_tokens=48, chunk_overlap=12, batch_size=8, window_sentences=2, document_encoder="auto")
CLI_CONFIG = ["--chunk-tokens", "48", "--chunk-overlap", "12", "--batch-size", "8", "--window-sentences", "2",
              "--document-encoder", "auto"]


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (starting one takes seconds); builds below join it."""
    with RayBuild(RayOptions(workers=2)) as session:
        yield session


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, write_corpus) -> Path:
    return write_corpus(tmp_path_factory.mktemp("ray-corpus") / "corpus.jsonl", _corpus())


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus, encoder) -> Path:
    return build_index(corpus, tmp_path_factory.mktemp("single") / "idx", CONFIG, encoder=encoder, progress=False)


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory, cluster, corpus, encoder) -> Path:
    return build_index_on_ray(corpus, tmp_path_factory.mktemp("ray") / "idx", CONFIG, encoder=encoder,
                              progress=False, options=RayOptions(workers=2))


def _manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))


def _assert_same_index(a: Path, b: Path) -> None:
    ma, mb = _manifest(a), _manifest(b)
    assert ma["files"] == mb["files"]  # names, sizes and sha256 of every file
    arrays = sorted(p.name for p in a.glob("*.npy"))
    assert {"vectors.npy", "bm25_docs.npy", "bm25_weights.npy", "windows_vectors.npy", "tokens.npy"} <= set(arrays)
    for name in arrays:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert ma["counts"] == mb["counts"] and ma["windows"]["windows"] == mb["windows"]["windows"]


def test_ray_build_writes_the_single_process_index_byte_for_byte(single, on_ray):
    counts = _manifest(single)["counts"]
    assert counts["chunks"] > 2 * counts["documents"]  # the corpus really splits documents
    assert counts["chunks"] > 4 * CONFIG.batch_size  # and needs many encoder batches
    _assert_same_index(single, on_ray)
    manifest = _manifest(on_ray)
    assert manifest["ray"]["workers"] == 2 and manifest["ray"]["address"] == "local"
    used = manifest["params"]["document_encoder"]
    assert used == _manifest(single)["params"]["document_encoder"] and used in ("onnx-int8", "torch-bf16")


def test_cli_ray_build_again_is_the_same_index(cluster, corpus, single, on_ray, encoder, monkeypatch):
    """rag-index build --ray into the root of the first Ray build: a new version, the same arrays."""
    import rag_service.encoder.encode

    monkeypatch.setattr(rag_service.encoder.encode, "Encoder", lambda *args, **kwargs: encoder)
    root = on_ray.parent
    result = CliRunner().invoke(cli, ["build", "--input", str(corpus), "--output", str(root), "--no-progress",
                                      *CLI_CONFIG, "--ray", "--ray-workers", "2"])
    assert result.exit_code == 0, result.output
    again = Path(re.search(r"^path\s+(\S+)$", result.output, re.M).group(1))
    assert again != on_ray and (root / "CURRENT").resolve() == again.resolve()
    _assert_same_index(on_ray, again)
    assert _manifest(again)["ray"]["workers"] == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_fast_with_a_clear_error(corpus, encoder, tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(BuildError, match=rf"cannot reach a Ray cluster at {address}.*ray start --head"):
        build_index_on_ray(corpus, tmp_path / "x", CONFIG, encoder=encoder, progress=False,
                           options=RayOptions(address=address))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("address", ["nonsense", "host:port", ":6379"])
def test_malformed_address_is_named(address):
    with pytest.raises(BuildError, match=r"is not a Ray address"), RayBuild(RayOptions(address=address)):
        pass


def test_cli_bad_address_and_bad_options(corpus, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["build", "--input", str(corpus), "--output", str(tmp_path / "o"), "--no-progress",
                                 "--ray", f"127.0.0.1:{_closed_port()}"])
    assert result.exit_code == 1 and "cannot reach a Ray cluster" in result.output
    result = runner.invoke(cli, ["build", "--input", str(corpus), "--output", str(tmp_path / "o"), "--ray",
                                 "--ray-workers", "0"])
    assert result.exit_code == 2 and "--ray-workers" in result.output
    with pytest.raises(BuildError, match="cpus_per_worker must be >= 1"):
        RayOptions(cpus_per_worker=0).validate()


def test_without_ray_installed_the_error_says_how_to_install(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(BuildError, match=r"pip install 'rag-service\[ray\]'"):
        import_ray()
    result = CliRunner().invoke(cli, ["build", "--input", str(corpus), "--output", str(tmp_path / "o"), "--ray"])
    assert result.exit_code == 1 and "pip install 'rag-service[ray]'" in result.output
    assert not (tmp_path / "o").exists()


def test_the_request_path_does_not_import_ray():
    import subprocess

    code = ("import sys, rag_service.api.server, rag_service.search.pipeline, rag_service.cli.serve; "
            "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
