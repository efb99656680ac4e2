from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from rag_service.analysis import LUCENE_ENGLISH_STOP_WORDS, Analyzer


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
