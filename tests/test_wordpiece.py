"""The native WordPiece (kernels.native.wordpiece) against the Hugging Face tokenizer it stands in for: the query
encoder's ids for ASCII text, which text it leaves to the tokenizer, which tokenizers it takes, and the encoder's
feeds and vectors with it and without it."""

from __future__ import annotations

import json
import logging
import random
import string

import numpy as np
import pytest
from tokenizers import Tokenizer

from rag_service.encoder import onnx_export
from rag_service.encoder.encode import WORDPIECE_PROBES, OnnxEncoder, checked_wordpiece
from rag_service.kernels import native

pytestmark = pytest.mark.skipif(not hasattr(native._native, "WordPiece"), reason="needs rag_service._native")


@pytest.fixture(scope="module")
def export_dir():
    return onnx_export.cached_export()


@pytest.fixture(scope="module")
def tokenizer(export_dir):
    """The query encoder's tokenizer as OnnxEncoder runs it: truncated at the model's length, batches padded."""
    config = json.loads((export_dir / onnx_export.CONFIG_FILE).read_text())
    tokenizer = Tokenizer.from_file(str(export_dir / onnx_export.TOKENIZER_FILE))
    tokenizer.enable_truncation(max_length=int(config["max_seq_length"]))
    tokenizer.enable_padding()
    return tokenizer


@pytest.fixture(scope="module")
def wordpiece(tokenizer):
    made, why = native.wordpiece(tokenizer.to_str())
    assert made is not None, why
    return made


def random_texts(tokenizer, seed: int, n: int) -> list[str]:
    """ASCII texts of every kind the pipeline treats apart: letters of both cases, digits, each punctuation
    character, runs of spaces, tabs and newlines, the vocabulary's own pieces ("##" ones included) glued together
    or apart, words past the longest a word may be, and a few characters it must leave to the tokenizer."""
    rng = random.Random(seed)
    pieces = [p for p in tokenizer.get_vocab() if p.isascii()]
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    \t\n\r"
    texts = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        elif kind == 1:
            text = rng.choice(["", " ", "-", ".", "##", "'"]).join(
                rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        elif kind == 2:
            text = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 130)))
                            for _ in range(rng.randint(1, 4)))
        else:
            text = rng.choice(pieces).upper() + rng.choice(["", "é", "\x07", "[MASK]", "[sep]", "東", "\x7f"]) + \
                rng.choice(pieces)
        texts.append(text)
    return texts


@pytest.mark.parametrize("seed", range(3))
def test_the_ids_are_the_tokenizers_for_every_text_it_takes(tokenizer, wordpiece, seed):
    texts = random_texts(tokenizer, seed, 3000)
    taken = 0
    for text in texts:
        ids = wordpiece.encode(text)
        if ids is None:
            assert not text.isascii() or any(c in text for c in "\x07\x7f") or "[" in text
            continue
        taken += 1
        assert ids.dtype == np.int64
        assert ids.tolist() == tokenizer.encode(text).ids, repr(text)
    assert taken > 0.7 * len(texts)
    unk = tokenizer.token_to_id("[UNK]")
    assert any(unk in tokenizer.encode(t).ids for t in texts if wordpiece.encode(t) is not None)


def test_it_leaves_other_text_to_the_tokenizer(wordpiece):
    for text in ["café", "naïve Straße", "東京", "bell\x07", "del\x7f", "nul\x00", "a\x0bb", "a\x0cb", "[MASK] x",
                 "the [cls] token", "[SEP]", "[pad]", "[UNK]"]:
        assert wordpiece.encode(text) is None, repr(text)


def test_a_long_text_is_cut_where_the_tokenizer_cuts_it(tokenizer, wordpiece):
    for text in ["word " * 1000, "a-" * 300, "x" * 5000, "unaffable " * 200]:
        ids = wordpiece.encode(text)
        assert ids is not None and ids.tolist() == tokenizer.encode(text).ids
        assert len(ids) <= tokenizer.truncation["max_length"]
    assert wordpiece.encode("").tolist() == tokenizer.encode("").ids  # [CLS] [SEP]


def test_only_the_bert_pipeline_is_taken(tokenizer):
    spec = json.loads(tokenizer.to_str())

    def changed(path: tuple[str, ...], value) -> str:
        copy = json.loads(json.dumps(spec))
        at = copy
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = value
        return json.dumps(copy)

    cases = [
        (("normalizer", "lowercase"), False, "normalizer"),
        (("normalizer",), None, "normalizer"),
        (("pre_tokenizer",), {"type": "Whitespace"}, "pre-tokenizer"),
        (("model", "type"), "BPE", "model"),
        (("model", "continuing_subword_prefix"), "@@", "model"),
        (("post_processor",), None, "post-processor"),
        (("post_processor", "single"), spec["post_processor"]["single"][:2], "post-processor"),
        (("truncation",), {"max_length": 16, "stride": 2, "direction": "Right", "strategy": "LongestFirst"},
         "truncation"),
        (("truncation",), {"max_length": 16, "stride": 0, "direction": "Left", "strategy": "LongestFirst"},
         "truncation"),
        (("padding",), {"strategy": {"Fixed": 64}, "direction": "Right", "pad_id": 0, "pad_type_id": 0,
                        "pad_token": "[PAD]", "pad_to_multiple_of": None}, "padding"),
    ]
    for path, value, named in cases:
        made, why = native.wordpiece(changed(path, value))
        assert made is None and named in why, (path, why)


def test_a_wordpiece_that_disagrees_is_not_used(tokenizer, monkeypatch, caplog):
    class Wrong:
        def encode(self, text: str):
            return np.array([101, 7, 102], dtype=np.int64)

    monkeypatch.setattr(native, "wordpiece", lambda spec: (Wrong(), ""))
    with caplog.at_level(logging.WARNING, logger="rag_service.encoder.encode"):
        assert checked_wordpiece(tokenizer) is None
    assert "native WordPiece gives" in caplog.text
    monkeypatch.setattr(native, "wordpiece", lambda spec: (None, "the extension has no WordPiece"))
    assert checked_wordpiece(tokenizer) is None
    assert any(not t.isascii() for t in WORDPIECE_PROBES) and any(len(t) > 100 for t in WORDPIECE_PROBES)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="special token id 9"):
        native._native.WordPiece(["[UNK]", "a"], 0, 9, 1, 100, 10, [])
    with pytest.raises(ValueError, match=r"vocab\[1\] must be a str"):
        native._native.WordPiece(["[UNK]", 3], 0, 0, 0, 100, 10, [])
    with pytest.raises(ValueError, match=r"added\[0\] must be a str"):
        native._native.WordPiece(["[UNK]"], 0, 0, 0, 100, 10, [None])


def test_the_encoder_feeds_and_vectors_are_the_same_either_way(export_dir):
    encoder = OnnxEncoder(export_dir, "onnx-int8")
    assert encoder._wordpiece is not None
    queries = ["DNA", "0-dimensional biomaterials show inductive properties.", "What's IL-2's role (in vivo)?",
               "café au lait", "word " * 400]
    with_native = [encoder._feeds([q]) for q in queries]
    vectors = [encoder.encode_queries([q]) for q in queries]  # one at a time, as the server asks
    encoder._wordpiece = None
    for query, feeds, vector in zip(queries, with_native, vectors, strict=True):
        plain = encoder._feeds([query])
        for name in feeds:
            np.testing.assert_array_equal(feeds[name], plain[name], err_msg=f"{name} of {query[:20]!r}")
        np.testing.assert_array_equal(vector, encoder.encode_queries([query]))
