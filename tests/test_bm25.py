from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from rag_service.core.errors import InvalidArgument
from rag_service.kernels.native import word_ids_memo
from rag_service.retrievers.analysis import Analyzer
from rag_service.retrievers.lexical import (
    DOCS_FILE,
    INDPTR_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    WORDS_FILE,
    BM25Index,
    BM25Params,
    build_postings,
    idf_values,
)


def make_index(tmp_path, corpus, analyzer=None, **params):
    postings = build_postings(corpus, BM25Params(**params))
    postings.write(tmp_path, analyzer or Analyzer())
    return BM25Index.load(tmp_path)


def random_corpus(rng, n_docs, vocab_size):
    vocab = [f"t{i}" for i in range(vocab_size)]
    # Zipf-ish term choice, so some terms are in more than half the documents (negative okapi idf).
    p = 1.0 / np.arange(1, vocab_size + 1)
    p /= p.sum()
    corpus = [list(rng.choice(vocab, size=int(rng.integers(0, 40)), p=p)) for _ in range(n_docs)]
    corpus[0] = corpus[0] or ["t0"]  # rank-bm25 divides by avgdl
    return corpus, vocab


def random_queries(rng, vocab):
    queries = [[], ["unknown"], ["t0"], ["t1", "t1", "t1"], ["nope", "t2", "zzz"]]
    for _ in range(8):
        q = list(rng.choice(vocab, size=int(rng.integers(1, 8))))
        q += q[: int(rng.integers(0, 3))]  # repeated terms count again, as in rank-bm25
        if rng.random() < 0.3:
            q.append("never-seen")
        queries.append(q)
    return queries


def reference_scores(reference: BM25Okapi, query) -> np.ndarray:
    if reference.k1 > 0:
        return reference.get_scores(query)
    # With k1 = 0 rank-bm25 computes 0/0 for documents without a term; the limit (and our score) is 0 there, so
    # score term by term and zero those.
    total = np.zeros(reference.corpus_size)
    with np.errstate(invalid="ignore"):
        for term in query:
            total += np.nan_to_num(reference.get_scores([term]), nan=0.0)
    return total


def lucene_idf(reference: BM25Okapi) -> dict[str, float]:
    n = reference.corpus_size
    df: dict[str, int] = {}
    for freqs in reference.doc_freqs:
        for term in freqs:
            df[term] = df.get(term, 0) + 1
    return {t: float(np.log(1 + (n - d + 0.5) / (d + 0.5))) for t, d in df.items()}


CASES = [(seed, k1, b) for seed in range(4) for k1, b in [(0.9, 0.4), (1.5, 0.75), (1.2, 0.0), (0.0, 1.0)]]


@pytest.mark.parametrize("seed,k1,b", CASES)
def test_okapi_scores_match_rank_bm25(tmp_path, seed, k1, b):
    rng = np.random.default_rng(seed)
    corpus, vocab = random_corpus(rng, n_docs=int(rng.integers(5, 120)), vocab_size=int(rng.integers(3, 60)))
    index = make_index(tmp_path, corpus, k1=k1, b=b, idf="okapi")
    reference = BM25Okapi(corpus, k1=k1, b=b)
    for query in random_queries(rng, vocab):
        np.testing.assert_allclose(index.score_all(query), reference_scores(reference, query), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,k1,b", CASES)
def test_lucene_scores_match_rank_bm25_with_lucene_idf(tmp_path, seed, k1, b):
    rng = np.random.default_rng(100 + seed)
    corpus, vocab = random_corpus(rng, n_docs=int(rng.integers(5, 120)), vocab_size=int(rng.integers(3, 60)))
    index = make_index(tmp_path, corpus, k1=k1, b=b, idf="lucene")
    reference = BM25Okapi(corpus, k1=k1, b=b)
    reference.idf = lucene_idf(reference)
    for query in random_queries(rng, vocab):
        expected = reference_scores(reference, query)
        np.testing.assert_allclose(index.score_all(query), expected, rtol=1e-5, atol=1e-5)
        # search returns exactly the positive scores, best first, ties by id
        ids, scores = index.search_tokens(query, depth=len(corpus))
        ours = index.score_all(query)
        order = np.lexsort((np.arange(len(corpus)), -ours))
        order = order[ours[order] > 0]
        np.testing.assert_array_equal(ids, order)
        np.testing.assert_array_equal(scores, ours[order])
        assert set(ids) == set(np.flatnonzero(expected > 1e-6)) | set(np.flatnonzero(ours > 0))


def test_idf_formulas():
    df = np.array([1, 5, 9, 10])
    np.testing.assert_allclose(idf_values(df, 10, "lucene"), np.log(1 + (10 - df + 0.5) / (df + 0.5)))
    okapi = idf_values(df, 10, "okapi", epsilon=0.25)
    raw = np.log(10 - df + 0.5) - np.log(df + 0.5)
    assert (raw[2:] < 0).all()
    np.testing.assert_allclose(okapi, np.where(raw < 0, 0.25 * raw.mean(), raw))


@pytest.mark.parametrize("idf", ["lucene", "okapi"])
def test_idf_and_ids_are_idf_of_and_the_sorted_term_ids(tmp_path, idf):
    rng = np.random.default_rng(5)
    corpus, vocab = random_corpus(rng, 60, 30)
    index = make_index(tmp_path, corpus, idf=idf)
    table = idf_values(index.df, index.corpus_chunks, idf)
    for query in random_queries(rng, vocab):
        weights, ids = index.idf_and_ids(query)
        assert weights == index.idf_of(query)
        # a known term's own idf, an unknown one the largest
        assert all(w == (float(table[index.vocab[t]]) if t in index.vocab else float(table.max()))
                   for t, w in weights.items())
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(ids, np.sort(index.term_ids(query)))


def test_empty_and_unknown_queries_find_nothing(tmp_path):
    index = make_index(tmp_path, [["a", "b"], ["b", "c"]])
    for query in ([], ["zzz"], ["zzz", "yyy"]):
        ids, scores = index.search_tokens(query, depth=10)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        assert len(ids) == len(scores) == 0
        assert not index.score_all(query).any()


def test_ties_break_by_id_and_depth_cuts(tmp_path):
    # Docs 1, 3, 5, 7 are identical (equal scores); doc 4 has the term twice (higher); the rest lack it.
    corpus = [["x", "y"], ["a", "y"], ["x"], ["a", "y"], ["a", "a"], ["a", "y"], ["z"], ["a", "y"]]
    index = make_index(tmp_path, corpus)
    ids, scores = index.search_tokens(["a"], depth=10)
    assert ids.tolist() == [4, 1, 3, 5, 7]
    assert scores[0] > scores[1] == scores[2] == scores[3] == scores[4] > 0
    ids3, scores3 = index.search_tokens(["a"], depth=3)
    assert ids3.tolist() == [4, 1, 3]
    np.testing.assert_array_equal(scores3, scores[:3])
    assert index.search_tokens(["a"], depth=1)[0].tolist() == [4]


def test_many_ties_beyond_depth_keep_the_lowest_ids(tmp_path):
    corpus = [["same"] for _ in range(300)]
    index = make_index(tmp_path, corpus)
    ids, _ = index.search_tokens(["same"], depth=17)
    assert ids.tolist() == list(range(17))


def test_mask_is_applied_before_the_top_n_cut(tmp_path):
    rng = np.random.default_rng(7)
    corpus, vocab = random_corpus(rng, n_docs=400, vocab_size=30)
    index = make_index(tmp_path, corpus)
    mask = rng.random(400) < 0.2
    for query in random_queries(rng, vocab):
        full_ids, full_scores = index.search_tokens(query, depth=400)
        allowed = mask[full_ids]
        for depth in (1, 5, 50):
            ids, scores = index.search_tokens(query, depth=depth, mask=mask)
            np.testing.assert_array_equal(ids, full_ids[allowed][:depth])
            np.testing.assert_array_equal(scores, full_scores[allowed][:depth])
    none_ids, _ = index.search_tokens(["t0"], depth=10, mask=np.zeros(400, dtype=bool))
    assert len(none_ids) == 0


def test_bad_arguments(tmp_path):
    index = make_index(tmp_path, [["a"], ["b"]])
    with pytest.raises(InvalidArgument) as err:
        index.search_tokens(["a"], depth=0)
    assert err.value.field == "depth"
    with pytest.raises(ValueError, match="shape"):
        index.search_tokens(["a"], depth=1, mask=np.ones(3, dtype=bool))


def test_params_are_validated():
    for params in (BM25Params(k1=-1), BM25Params(b=1.5), BM25Params(idf="tfidf")):
        with pytest.raises(ValueError):
            build_postings([["a"]], params)


def test_search_analyzes_the_query_like_the_documents(tmp_path):
    analyzer = Analyzer()
    texts = ["Volcanoes erupt lava and magma", "The ocean is deep and blue", "Running volcano tours"]
    index = make_index(tmp_path, [analyzer.tokens(t) for t in texts], analyzer=analyzer)
    ids, _ = index.search("the VOLCANO erupted", depth=5)
    assert ids.tolist() == [0, 2]
    assert index.search("and the of", depth=5)[0].tolist() == []  # stop words only


def test_query_term_ids_are_the_term_ids_of_the_analysed_query_each_time(tmp_path, monkeypatch):
    """The per-word memo gives what the analyser and the vocabulary give, the first time a word is seen (filled in)
    and after (read); stop words, unknown words, repeats, case, other scripts, and a full memo that starts over."""
    import rag_service.retrievers.lexical as lexical

    analyzer = Analyzer()
    rng = np.random.default_rng(11)
    words = ["volcano", "Volcanoes", "erupted", "lava", "the", "and", "not", "ocean", "deep", "blue", "Straße",
             "İstanbul", "naïve", "東京", "x_1", "42", "zzzunknown", "running", "RUNS", "ﬁne", "ǅemal"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(0, 12)))) + rng.choice(["", "!", " ?", "--"])
             for _ in range(300)]
    index = make_index(tmp_path, [analyzer.tokens(t) for t in texts[:40]], analyzer=analyzer)
    monkeypatch.setattr(lexical, "WORD_IDS_LIMIT", 8)  # the memo starts over several times along the way
    for _ in range(2):
        for text in texts:
            got = index.query_term_ids(text)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, index.term_ids(analyzer.tokens(text)))
    assert index.query_term_ids("").tolist() == [] and index.query_term_ids("the and of").tolist() == []
    # What the memo rests on: the analyser's tokens are the terms of its words, in order.
    for text in texts:
        assert analyzer.tokens(text) == [t for t in analyzer.stems(analyzer.words(text)) if t is not None]


@pytest.mark.skipif(word_ids_memo() is None, reason="needs rag_service._native")
def test_an_ascii_query_seen_before_takes_its_term_ids_from_the_native_memo(tmp_path, monkeypatch):
    """Once its words are held, an ASCII query's ids come from the C++ memo without the analyser; they equal the
    analyser's for every seeded query, with case, digits, underscores, punctuation and stop words; a query with
    another character, or a word not held, goes the Python way; a full memo starts over in both."""
    import rag_service.retrievers.lexical as lexical

    analyzer = Analyzer()
    rng = np.random.default_rng(5)
    words = ["Volcano", "volcanoes", "ERUPTED", "lava", "the", "and", "not", "x_1", "42", "deep-sea", "zzzunknown",
             "running", "café", "it's", "U.S.A", "__init__", "ocean"]
    texts = [rng.choice([" ", ", ", "!", "\t", "--"]).join(rng.choice(words, size=int(rng.integers(0, 10))))
             for _ in range(200)]
    index = make_index(tmp_path, [analyzer.tokens(t) for t in texts[:30]], analyzer=analyzer)
    held = index._native_word_ids
    assert held is not None and len(held) == 0
    for text in texts:  # the first pass fills both memos
        np.testing.assert_array_equal(index.query_term_ids(text), index.term_ids(analyzer.tokens(text)))
    assert len(held) == sum(w.isascii() for w in index._word_ids)
    want = [index.term_ids(analyzer.tokens(text)) for text in texts]
    unseen = "volcano brandnewword"
    want_unseen = index.term_ids(analyzer.tokens(unseen))
    real_words = index.analyzer.words
    python_way: list[str] = []
    monkeypatch.setattr(index.analyzer, "words", lambda text: python_way.append(text) or real_words(text))
    for text, ids in zip(texts, want, strict=True):
        got = index.query_term_ids(text)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ids)
    asked = set(python_way)
    assert all(not t.isascii() for t in asked if t in texts)  # an ASCII query seen before never took the Python way
    assert any(not t.isascii() for t in texts) and any(t in asked for t in texts if not t.isascii())
    python_way.clear()
    np.testing.assert_array_equal(index.query_term_ids(unseen), want_unseen)
    assert unseen in python_way  # a word not held yet: learned the Python way, then held
    python_way.clear()
    index.query_term_ids(unseen)
    assert unseen not in python_way
    monkeypatch.setattr(lexical, "WORD_IDS_LIMIT", 0)
    index.query_term_ids("another brandnewword2")  # over the limit: both memos start over with its words only
    assert len(held) == sum(w.isascii() for w in index._word_ids) == 2


@pytest.mark.skipif(word_ids_memo() is None, reason="needs rag_service._native")
def test_the_native_word_memo_splits_as_the_analyser_and_checks_its_input():
    held = word_ids_memo()
    assert held.lookup("anything") is None and held.lookup("") is not None and len(held.lookup("")) == 0
    held.add(["hello", "world", "the", "x_1", "42", "naïve"], [3, 7, -1, 5, 8, 9])
    assert len(held) == 5  # the non-ASCII word is not held: a query with it never asks the memo
    assert held.lookup("Hello, WORLD! the x_1 (42)").tolist() == [3, 7, 5, 8]
    assert held.lookup("the the").tolist() == []
    assert held.lookup("hello naïve") is None and held.lookup("hello planet") is None
    assert held.lookup("hello_world") is None  # one word here, as `\w+` has it
    with pytest.raises(ValueError, match="words and ids must have the same length"):
        held.add(["a", "b"], [1])
    held.clear()
    assert len(held) == 0 and held.lookup("hello") is None


@pytest.mark.skipif(word_ids_memo() is None, reason="needs rag_service._native")
def test_the_native_word_memo_keeps_seeded_words_through_a_clear():
    held = word_ids_memo()
    held.seed(["hello", "the", "naïve"], [3, -1, 4])
    held.add(["world"], [7])
    assert (held.seeded, len(held)) == (2, 1)
    assert held.lookup("Hello the WORLD").tolist() == [3, 7]
    held.clear()
    assert (held.seeded, len(held)) == (2, 0)
    assert held.lookup("hello the").tolist() == [3] and held.lookup("hello world") is None
    held.add(["hello"], [9])  # a learned word never hides a seeded one: both come from the same analyser
    assert held.lookup("hello").tolist() == [3]
    with pytest.raises(ValueError, match="words and ids must have the same length"):
        held.seed(["a"], [])


def _corpus_index(tmp_path, texts, analyzer=None):
    """An index over `texts` as a build makes it: the analyser that made the postings writes the corpus's words."""
    analyzer = analyzer or Analyzer()
    return make_index(tmp_path, [analyzer.tokens(t) for t in texts], analyzer=analyzer)


def test_the_build_writes_the_corpus_words_with_the_term_ids_the_analyser_gives(tmp_path):
    texts = ["Volcanoes ERUPTED lava, and the magma flows", "The ocean is deep: 42 metres_deep", "Café naïve x_1"]
    index = _corpus_index(tmp_path, texts)
    words = json.loads((tmp_path / WORDS_FILE).read_text())
    analyzer = Analyzer()
    expected = {w for t in texts for w in analyzer.words(t) if w.isascii()}
    assert set(words) == expected and "café" not in words  # ASCII words only: the only ones the C++ memo holds
    for word, i in words.items():
        np.testing.assert_array_equal(index.term_ids(analyzer.tokens(word)), [i] if i >= 0 else [])
    assert words["the"] == -1 and words["and"] == -1


@pytest.mark.skipif(word_ids_memo() is None, reason="needs rag_service._native")
@pytest.mark.parametrize("seed", range(3))
def test_a_query_of_corpus_words_gets_its_term_ids_without_the_analyser_the_first_time(tmp_path, monkeypatch,
                                                                                         seed):
    """A fresh index answers an ASCII query made of its corpus's words from the seeded memo on first sight, with the
    analyser's ids; a query with any other word goes the Python way; the seeds outlive the learned memo's limit."""
    import rag_service.retrievers.lexical as lexical

    rng = np.random.default_rng(seed)
    corpus_words = ["Volcano", "volcanoes", "ERUPTED", "lava", "the", "and", "not", "x_1", "42", "deep", "running",
                    "ocean", "Blue", "of"]
    other = ["zzzunknown", "brandnew", "café"]
    texts = [" ".join(rng.choice(corpus_words, size=int(rng.integers(1, 12)))) for _ in range(40)]
    _corpus_index(tmp_path, texts)
    index = BM25Index.load(tmp_path)  # what a server loads: nothing learned yet
    analyzer = Analyzer()
    held = index._native_word_ids
    assert held is not None and held.seeded == len({w.lower() for w in corpus_words}) and len(held) == 0
    real_words = index.analyzer.words
    python_way: list[str] = []
    monkeypatch.setattr(index.analyzer, "words", lambda text: python_way.append(text) or real_words(text))
    queries = [rng.choice([" ", ", ", "? ", "--"]).join(rng.choice(corpus_words + other, size=int(rng.integers(0, 8))))
               for _ in range(200)]
    monkeypatch.setattr(lexical, "WORD_IDS_LIMIT", 2)  # the learned memo starts over again and again
    for query in queries:
        np.testing.assert_array_equal(index.query_term_ids(query), index.term_ids(analyzer.tokens(query)))
    of_corpus = [q for q in queries if not any(w in q for w in other)]
    assert of_corpus and not set(of_corpus) & set(python_way)
    assert any(w in q for q in python_way for w in other)
    assert held.seeded == len({w.lower() for w in corpus_words})


def test_an_index_without_the_corpus_words_or_with_another_analyser_learns_from_queries(tmp_path):
    texts = ["volcanoes erupted", "the deep ocean", "running lava"]
    _corpus_index(tmp_path, texts)
    (tmp_path / WORDS_FILE).unlink()
    index = BM25Index.load(tmp_path)
    analyzer = Analyzer()
    for query in ["volcano ocean", "lava the running", "nothing here"]:
        np.testing.assert_array_equal(index.query_term_ids(query), index.term_ids(analyzer.tokens(query)))
    if index._native_word_ids is not None:
        assert index._native_word_ids.seeded == 0
    other = tmp_path / "other"
    other.mkdir()
    _corpus_index(other, texts)
    unstemmed = BM25Index.load(other, analyzer=Analyzer(stemmer=None))
    if unstemmed._native_word_ids is not None:
        assert unstemmed._native_word_ids.seeded == 0  # the build's words say what another analyser would not


@pytest.mark.parametrize("body,match", [
    ("[1, 2]", "expected an object of word -> term id"),
    ('{"lava": 99}', "word 'lava' has term id 99"),
    ('{"lava": -2}', "word 'lava' has term id -2"),
    ('{"lava": "3"}', "word 'lava' has term id '3'"),
    ('{"lava": 1.0}', "word 'lava' has term id 1.0"),
    ("{not json", "cannot read"),
])
def test_a_damaged_words_file_fails_the_load_naming_it(tmp_path, body, match):
    from rag_service.core.errors import IndexFormatError

    _corpus_index(tmp_path, ["volcanoes erupted", "the deep ocean"])
    (tmp_path / WORDS_FILE).write_text(body)
    with pytest.raises(IndexFormatError, match=WORDS_FILE) as raised:
        BM25Index.load(tmp_path)
    assert match in str(raised.value)


def test_on_disk_layout(tmp_path):
    corpus = [["b", "a", "b"], ["c"], ["a", "c", "c"]]
    make_index(tmp_path, corpus, k1=1.2, b=0.75)
    vocab = json.loads((tmp_path / VOCAB_FILE).read_text())
    assert vocab == {"a": 0, "b": 1, "c": 2}
    indptr = np.load(tmp_path / INDPTR_FILE)
    docs = np.load(tmp_path / DOCS_FILE)
    weights = np.load(tmp_path / WEIGHTS_FILE)
    assert (indptr.dtype, docs.dtype, weights.dtype) == (np.int64, np.int32, np.float32)
    assert indptr.tolist() == [0, 2, 3, 5]
    assert docs.tolist() == [0, 2, 0, 1, 2]  # per term, chunk ids ascending
    index = BM25Index.load(tmp_path)
    assert isinstance(np.load(tmp_path / DOCS_FILE, mmap_mode="r"), np.memmap)
    assert index.n_chunks == 3 and index.avgdl == pytest.approx(7 / 3)


def test_concurrent_searches_agree_with_sequential(tmp_path):
    rng = np.random.default_rng(3)
    corpus, vocab = random_corpus(rng, n_docs=2000, vocab_size=200)
    index = make_index(tmp_path, corpus)
    queries = [random_queries(rng, vocab)[-1] for _ in range(200)]
    mask = rng.random(2000) < 0.5
    expected = [index.search_tokens(q, 20, mask if i % 2 else None) for i, q in enumerate(queries)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda iq: index.search_tokens(iq[1], 20, mask if iq[0] % 2 else None),
                            enumerate(queries)))
    for (e_ids, e_scores), (g_ids, g_scores) in zip(expected, got):
        np.testing.assert_array_equal(e_ids, g_ids)
        np.testing.assert_array_equal(e_scores, g_scores)
