from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from rag_service.retrievers.analysis import LUCENE_ENGLISH_STOP_WORDS, Analyzer


def test_lowercases_drops_stop_words_and_stems():
    assert Analyzer().tokens("The Running Dogs are FAST, and the cats were cycling!") == [
        "run", "dog", "fast", "cat", "were", "cycl"
    ]


def test_lucene_stop_word_set_is_the_33_english_words():
    assert len(LUCENE_ENGLISH_STOP_WORDS) == 33
    assert {"a", "the", "with", "will", "such", "into"} <= LUCENE_ENGLISH_STOP_WORDS
    assert "were" not in LUCENE_ENGLISH_STOP_WORDS  # not in Lucene's list, unlike NLTK's
    assert Analyzer().tokens(" ".join(sorted(LUCENE_ENGLISH_STOP_WORDS)).upper()) == []


def test_unicode_words_and_digits_are_tokens():
    tokens = Analyzer(stemmer=None).tokens("Café ÜBER naïve 2023 covid-19 x_y 日本語 αβγ")
    assert tokens == ["café", "über", "naïve", "2023", "covid", "19", "x_y", "日本語", "αβγ"]


def test_punctuation_and_empty_text_give_no_tokens():
    assert Analyzer().tokens("") == []
    assert Analyzer().tokens("... -- !!! ,,,") == []


def test_stemming_and_stop_words_can_be_switched_off():
    assert Analyzer(stemmer=None, stopwords=None).tokens("The cats") == ["the", "cats"]
    assert Analyzer(stemmer="english", stopwords=None).tokens("The cats") == ["the", "cat"]


def test_settings_round_trip():
    analyzer = Analyzer(stemmer="english", stopwords=None)
    again = Analyzer.from_settings(analyzer.settings())
    assert again.settings() == analyzer.settings()
    assert again.tokens("The running cats") == analyzer.tokens("The running cats")


@pytest.mark.parametrize("kwargs", [{"stemmer": "klingon"}, {"stopwords": "klingon"}])
def test_unknown_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="klingon"):
        Analyzer(**kwargs)


def test_same_results_from_many_threads():
    analyzer = Analyzer()
    texts = [f"Runners running {i} times through generalizations of organizational cycles" for i in range(400)]
    expected = [analyzer.tokens(t) for t in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(analyzer.tokens, texts)) == expected


def test_memoised_words_give_the_unmemoised_tokens_across_calls_and_a_cleared_memo(monkeypatch):
    import Stemmer

    from rag_service.retrievers import analysis

    stemmer = Stemmer.Stemmer("english")

    def reference(text: str) -> list[str]:
        words = analysis._WORD.findall(text.lower())
        return stemmer.stemWords([w for w in words if w not in LUCENE_ENGLISH_STOP_WORDS])

    monkeypatch.setattr(analysis, "_MEMO_LIMIT", 4)  # cleared and refilled many times below
    analyzer = Analyzer()
    texts = ["The cats and the running dogs", "cats CATS cat's", "", "of the a", "Generalizations were cycling fast",
             "the cats and the running dogs again"] * 3
    for text in texts:
        assert analyzer.tokens(text) == reference(text)
    assert len(analyzer._memo()) <= 4 + len(set(analysis._WORD.findall(texts[-1].lower())))
