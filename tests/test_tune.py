"""rag-index tune: the query split, the training loop, the model folder it writes, and a build with the tuned model
served by a real server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rag_service.index import tune as tune_mod

TOPICS = {
    "volcano": ("Volcanoes", "A volcano erupts when magma rises through the crust and lava, ash and gases escape "
                "through a vent in the mountain.", "what makes magma come out of a mountain"),
    "glacier": ("Glaciers", "A glacier is a persistent body of dense ice that moves under its own weight and carves "
                "U-shaped valleys.", "slow rivers of ice that shape valleys"),
    "earthquake": ("Earthquakes", "Earthquakes are the shaking of the ground caused by a sudden slip on a fault, "
                   "releasing seismic waves.", "why does the ground shake when a fault slips"),
    "photosynthesis": ("Photosynthesis", "Green plants use chlorophyll to turn sunlight, water and carbon dioxide "
                       "into sugar and oxygen.", "how leaves make sugar from light"),
    "dna": ("DNA", "Deoxyribonucleic acid carries genetic instructions as a double helix of paired bases.",
            "the molecule that stores hereditary information"),
    "aqueduct": ("Roman aqueducts", "The Romans built aqueducts of stone arches that carried water by gravity into "
                 "their cities.", "ancient channels bringing water to Rome"),
    "printing": ("The printing press", "Gutenberg's movable type press spread books and literacy across Europe.",
                 "who made books cheap in the fifteenth century"),
    "light": ("Speed of light", "Light travels through a vacuum at 299,792,458 metres per second.",
              "how fast do photons move in empty space"),
    "gravity": ("Gravity", "Gravity attracts masses to one another; Einstein described it as curved spacetime.",
                "why do apples fall towards the earth"),
    "bridge": ("Suspension bridges", "A suspension bridge hangs its deck from cables slung between towers.",
               "decks held up by cables between towers"),
    "coffee": ("Coffee", "Coffee is brewed from roasted beans; its caffeine makes it a stimulant.",
               "morning drink from roasted beans that keeps you awake"),
    "bread": ("Sourdough bread", "Sourdough is leavened by wild yeast and lactic acid bacteria in a starter.",
              "bread raised with a fermented starter"),
    "tides": ("Tides", "Tides are the rise and fall of sea levels caused by the moon's gravitational pull.",
              "why the sea rises and falls twice a day"),
    "vaccine": ("Vaccines", "A vaccine trains the immune system to recognise a pathogen without causing disease.",
                "teaching the body to fight a virus before infection"),
    "rainbow": ("Rainbows", "A rainbow appears when sunlight is refracted and reflected inside raindrops.",
                "coloured arc in the sky after rain"),
    "compass": ("Compass", "A magnetic compass needle aligns with the earth's magnetic field and points north.",
                "needle that always points north"),
    "honey": ("Honey", "Bees make honey by evaporating flower nectar stored in wax combs.",
              "sweet food insects make from nectar"),
    "steam": ("Steam engine", "The steam engine turned the pressure of boiling water into mechanical work.",
              "machines driven by boiling water in the industrial revolution"),
    "penicillin": ("Penicillin", "Fleming found that a mould produced penicillin, an antibiotic killing bacteria.",
                   "the first antibiotic from a mould"),
    "desert": ("Deserts", "Deserts receive little rain, and their plants store water in thick stems.",
               "dry places where cacti keep water"),
}


def _write_data(root: Path, write_corpus) -> dict[str, Path]:
    corpus = write_corpus(root / "corpus.jsonl", ({"_id": k, "title": t, "text": x} for k, (t, x, _) in TOPICS.items()))
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"q-{k}", "text": q}) + "\n" for k, (_, _, q) in TOPICS.items()),
                       encoding="utf-8")
    (root / "qrels").mkdir()
    qrels = root / "qrels" / "train.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q-{k}\t{k}\t1\n" for k in TOPICS), encoding="utf-8")
    return {"corpus": corpus, "queries": queries, "qrels": qrels}


@pytest.mark.parametrize("n", [2, 5, 20, 809])
@pytest.mark.parametrize("share", [0.0, 0.15, 0.5])
def test_held_out_split_never_overlaps_the_training_queries(n, share):
    qids = [f"q{i}" for i in range(n)]
    train, held = tune_mod.split_queries(list(reversed(qids)), share, seed=3)
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(qids)
    assert len(held) == (0 if share == 0 else min(max(round(share * n), 1), n - 1))
    assert (train, held) == tune_mod.split_queries(qids, share, seed=3)  # seeded, whatever the input order
    if share and n >= 20:
        assert held != tune_mod.split_queries(qids, share, seed=4)[1]


def test_held_out_share_out_of_range_is_refused():
    with pytest.raises(ValueError, match="held_out"):
        tune_mod.split_queries(["a", "b"], 1.0, seed=0)


def test_a_batch_never_holds_one_query_twice():
    examples = [tune_mod.Example(qid=f"q{i % 5}", query="", positive=str(i), negatives=()) for i in range(23)]
    planned = tune_mod.batches(examples, 4, seed=1)
    assert sorted(i for b in planned for i in b) == list(range(23))
    for rows in planned:
        assert len(rows) <= 4
        assert len({examples[i].qid for i in rows}) == len(rows)


def test_train_config_names_the_bad_field():
    with pytest.raises(ValueError, match="batch_size"):
        tune_mod.TrainConfig(batch_size=1).validate()
    with pytest.raises(ValueError, match="loss"):
        tune_mod.TrainConfig(loss="triplet").validate()


@pytest.mark.slow
def test_training_lowers_the_loss_on_its_examples_and_resumes(tmp_path, encoder):
    """The loss over the training examples is lower after training than before; a resumed run continues from the
    checkpoint instead of starting over."""
    from sentence_transformers import SentenceTransformer

    from rag_service.encoder.encode import default_model_path

    keys = list(TOPICS)
    examples = [tune_mod.Example(qid=k, query=TOPICS[k][2], positive=f"{TOPICS[k][0]}. {TOPICS[k][1]}",
                                 negatives=(f"{TOPICS[keys[i - 1]][0]}. {TOPICS[keys[i - 1]][1]}",))
                for i, k in enumerate(keys)]
    config = tune_mod.TrainConfig(epochs=2, batch_size=5, learning_rate=2e-4, negatives=1, seed=0,
                                  checkpoint_every=2, threads=2)
    out = tmp_path / "model"
    result = tune_mod.train(default_model_path(), examples, [], out, tmp_path / "work", config, progress=False)
    assert result.steps == 8
    assert [h["epoch"] for h in result.history] == [0, 1, 2]

    def loss_of(path: str) -> float:
        model = SentenceTransformer(path, device="cpu")
        return tune_mod.held_out_loss(model, tune_mod._loss_module(model, config), examples, config)

    before, after = loss_of(default_model_path()), loss_of(str(out))
    assert after < before * 0.8, (before, after)

    # A run asked to resume a finished one finds nothing left to do: no step is trained twice.
    again = tune_mod.train(default_model_path(), examples, [], out, tmp_path / "work", config, resume=True,
                           progress=False)
    assert again.steps == result.steps
    with pytest.raises(ValueError, match="differs"):
        tune_mod.train(default_model_path(), examples, [], out, tmp_path / "work",
                       tune_mod.TrainConfig(epochs=3, batch_size=5, negatives=1), resume=True, progress=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, write_corpus):
    """`rag-index tune` on the tiny corpus, end to end through the CLI."""
    from rag_service.cli.index import cli

    root = tmp_path_factory.mktemp("tune")
    data = _write_data(root, write_corpus)
    out = root / "models" / "tiny-tuned"
    result = CliRunner().invoke(cli, ["tune", "--queries", str(data["queries"]), "--qrels", str(data["qrels"]),
                                      "--corpus", str(data["corpus"]), "--output", str(out), "--held-out", "0.25",
                                      "--epochs", "2", "--batch-size", "5", "--lr", "1e-4", "--threads", "2",
                                      "--no-progress", "--check", str(root), "--index-output",
                                      str(root / "from-tune")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"root": root, "model": out, "output": result.output, **data}


@pytest.mark.slow
def test_tune_writes_a_sentence_transformers_model_and_its_onnx_exports(tuned):
    from sentence_transformers import SentenceTransformer

    from rag_service.encoder.encode import OnnxEncoder

    model = SentenceTransformer(str(tuned["model"]), device="cpu")
    texts = ["why does the ground shake", "bees make honey from nectar"]
    reference = model.encode(texts, normalize_embeddings=True)
    assert reference.shape == (2, 384)
    for kind, floor in (("onnx-fp32", 0.9999), ("onnx-int8", 0.98)):
        vectors = OnnxEncoder(tuned["model"] / "onnx", kind=kind).encode_queries(texts)
        cosines = np.sum(vectors * reference, axis=1)
        assert np.all(cosines > floor), (kind, cosines)
    report = json.loads((tuned["model"] / "tune_report.json").read_text())
    train_q, held_q = tune_mod.split_queries([f"q-{k}" for k in TOPICS], 0.25, seed=0)
    assert report["queries"] == {"train": len(train_q), "held_out": len(held_q), "seed": 0}
    assert set(report["held_out"]) == {"base", "tuned_shipped_settings", "tuned"}
    assert str(tuned["root"]) in report["checks"]
    assert "check      " in tuned["output"] and "held out   nDCG@10" in tuned["output"]
    tuning = tune_mod.read_tuning(tuned["model"])
    assert tuning is not None and set(tuning["search"]) == {"fusion", "depth", "dense_weight"}
    assert not (tuned["model"].parent / f".{tuned['model'].name}.work").exists()  # removed after a good run


@pytest.mark.slow
def test_tune_publishes_the_index_it_refit_on_with_the_settings(tuned, tuned_index):
    """--index-output: the index tune built with the tuned model, republished with the refit settings, holds the
    same data as a build with the tuned model folder."""
    from rag_service.index.load import load_index

    from_tune, built = load_index(tuned["root"] / "from-tune"), load_index(tuned_index)
    assert len(list((tuned["root"] / "from-tune").glob("v-*"))) == 1  # the version without the settings is pruned
    assert from_tune.manifest["tuned"] == built.manifest["tuned"] == tune_mod.read_tuning(tuned["model"])
    assert from_tune.manifest["files"] == built.manifest["files"]


@pytest.mark.slow
def test_tune_refuses_to_overwrite_a_folder_without_resume(tuned):
    from rag_service.cli.index import cli

    result = CliRunner().invoke(cli, ["tune", "--queries", str(tuned["queries"]), "--qrels", str(tuned["qrels"]),
                                      "--corpus", str(tuned["corpus"]), "--output", str(tuned["model"])])
    assert result.exit_code != 0 and "not empty" in result.output


@pytest.fixture(scope="module")
def tuned_index(tuned, tmp_path_factory) -> Path:
    from rag_service.cli.index import cli

    root = tmp_path_factory.mktemp("tuned-index") / "index"
    result = CliRunner().invoke(cli, ["build", "--input", str(tuned["corpus"]), "--output", str(root), "--model",
                                      str(tuned["model"]), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "tuned      " in result.output
    return root


@pytest.mark.slow
def test_a_build_with_the_tuned_model_serves_its_fitted_settings(tuned, tuned_index, server_thread):
    from rag_service.client import RetrieverClient
    from rag_service.core.config import ServerConfig
    from rag_service.index.load import load_index

    root = tuned_index
    manifest = load_index(root).manifest
    tuning = tune_mod.read_tuning(tuned["model"])
    assert manifest["tuned"] == tuning
    assert manifest["model"]["name"] == "tiny-tuned"
    # The int8 query encoder exported into the index, not a torch model handed in by the test.
    config = ServerConfig(index=root, port=0, warmup_queries=1, encoder={"backend": "onnx-int8"})
    with server_thread(config, None) as running:
        searcher = running.server.servicer.pipeline
        assert searcher.search_defaults.dense_weight == tuning["search"]["dense_weight"]
        assert searcher.search_defaults.depth == tuning["search"]["depth"]
        assert searcher.rerank_model.sha256 == tuning["rerank_model"]["sha256"]
        assert searcher.encoder.name == "tiny-tuned"
        with RetrieverClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            reply = client.search("needle that always points north", top_k=3)
            assert reply.contexts[0].doc_id == "compass"
    # A setting the server's configuration gives explicitly wins over the index's.
    pinned = ServerConfig(index=root, port=0, warmup_queries=0, encoder={"backend": "onnx-int8"},
                          defaults={"dense_weight": 0.05})
    with server_thread(pinned, None) as running:
        defaults = running.server.servicer.pipeline.search_defaults
        assert defaults.dense_weight == 0.05 and defaults.depth == tuning["search"]["depth"]


@pytest.mark.slow
def test_rag_bench_quality_compares_two_indexes_in_one_call(tuned, tuned_index, tmp_path):
    from rag_service.cli.bench import main as bench
    from rag_service.cli.index import cli

    stock = tmp_path / "stock"
    built = CliRunner().invoke(cli, ["build", "--input", str(tuned["corpus"]), "--output", str(stock),
                                     "--no-progress"], catch_exceptions=False)
    assert built.exit_code == 0, built.output
    out = tmp_path / "report.json"
    result = CliRunner().invoke(bench, ["quality", "--index", f"stock={stock}", "--index", f"tuned={tuned_index}",
                                        "--queries", str(tuned["queries"]), "--qrels", str(tuned["qrels"]),
                                        "--method", "dense", "--method", "pipeline", "--encoder", "onnx-fp32",
                                        "--significance", "stock:pipeline,tuned:pipeline", "--json", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    comparison = report["comparison"]
    assert set(comparison["results"]) == {"stock:dense", "stock:pipeline", "tuned:dense", "tuned:pipeline"}
    test = comparison["significance"][0]["nDCG@10"]
    assert (test["a"], test["b"], test["queries"]) == ("stock:pipeline", "tuned:pipeline", len(TOPICS))
    assert "stock:pipeline vs tuned:pipeline nDCG@10" in result.output
    # Each index is searched with the settings it carries: the tuned one with its refit fusion weight.
    tuning = tune_mod.read_tuning(tuned["model"])
    assert report["indexes"]["tuned"]["params"]["dense_weight"] == tuning["search"]["dense_weight"]
    assert report["indexes"]["stock"]["params"]["dense_weight"] == 0.5
    # torch loads the packaged model, not the tuned one: refused rather than scored with the wrong encoder.
    wrong = CliRunner().invoke(bench, ["quality", "--index", f"stock={stock}", "--index", f"tuned={tuned_index}",
                                       "--queries", str(tuned["queries"]), "--qrels", str(tuned["qrels"])])
    assert wrong.exit_code != 0 and "onnx-fp32" in wrong.output
