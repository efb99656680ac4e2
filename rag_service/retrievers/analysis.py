"""Text analysis for BM25: the same analyzer runs at build and at query time, and its settings are recorded in the
index manifest so a server can rebuild exactly the analyzer an index was built with."""

from __future__ import annotations

import re
import threading
from typing import Any

import Stemmer

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (33 words). Kept identical so BM25 numbers are comparable with
# Lucene/Anserini runs over the same corpus.
LUCENE_ENGLISH_STOP_WORDS: frozenset[str] = frozenset(
    [
        "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
        "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
        "will", "with",
    ]
)

STOPWORD_SETS: dict[str, frozenset[str]] = {"english": LUCENE_ENGLISH_STOP_WORDS}

# \w is Unicode-aware for str patterns: letters and digits of every script (plus "_") form tokens.
_WORD = re.compile(r"\w+")
# Words memoised per thread before the memo is cleared (about 100 MB of strings at the limit).
_MEMO_LIMIT = 1_000_000


class Analyzer:
    """lowercase -> Unicode word tokens -> stop words removed -> Snowball stem.

    `stemmer` is a Snowball algorithm name known to PyStemmer ("english", ...) or None; `stopwords` is a key of
    STOPWORD_SETS or None. Safe to share between threads: PyStemmer objects are not thread-safe (they keep a stem
    cache), so each thread lazily gets its own.
    """

    def __init__(self, stemmer: str | None = "english", stopwords: str | None = "english") -> None:
        if stemmer is not None and stemmer not in Stemmer.algorithms():
            raise ValueError(f"unknown stemmer {stemmer!r}; known: {', '.join(Stemmer.algorithms())}")
        if stopwords is not None and stopwords not in STOPWORD_SETS:
            raise ValueError(f"unknown stop word set {stopwords!r}; known: {', '.join(STOPWORD_SETS)}")
        self.stemmer = stemmer
        self.stopwords = stopwords
        self._stop = STOPWORD_SETS[stopwords] if stopwords else frozenset()
        self._local = threading.local()

    def _stemmer(self) -> Stemmer.Stemmer | None:
        if self.stemmer is None:
            return None
        stemmer = getattr(self._local, "stemmer", None)
        if stemmer is None:
            # Without PyStemmer's own stem cache (maxCacheSize 0): `_memo` keeps every stem already, and that cache
            # holds a tracked list per word, which the collector's passes would walk (api/heap.py).
            stemmer = Stemmer.Stemmer(self.stemmer, 0)
            self._local.stemmer = stemmer
        return stemmer

    def words(self, text: str) -> list[str]:
        """The text's words as `tokens` splits them, before stop words and stemming."""
        return _WORD.findall(text.lower())

    def tokens(self, text: str) -> list[str]:
        words = self.words(text)
        # A build analyses millions of chunks over a vocabulary of some 10^5 words: one dict look-up per word (its
        # stem, or None for a stop word) replaces the stop-word filter and the stemmer call (1.9x faster warm).
        memo = self._memo()
        try:
            return [m for m in map(memo.__getitem__, words) if m is not None]
        except KeyError:
            self._learn(words, memo)
        return [m for m in map(memo.__getitem__, words) if m is not None]

    def stems(self, words: list[str]) -> list[str | None]:
        """Each of `words`' term (None for a stop word): `tokens(text)` is the terms of `words(text)`, in order."""
        memo = self._memo()
        try:
            return list(map(memo.__getitem__, words))
        except KeyError:
            self._learn(words, memo)
        return list(map(memo.__getitem__, words))

    def _learn(self, words: list[str], memo: dict[str, str | None]) -> None:
        """Adds `words`' stems (None for a stop word) to this thread's memo."""
        if len(memo) > _MEMO_LIMIT:  # a long-running server sees unbounded query vocabularies
            memo.clear()
        new = [w for w in set(words) if w not in memo]
        keep = [w for w in new if w not in self._stop]
        stemmer = self._stemmer()
        memo.update(dict.fromkeys(new))
        memo.update(zip(keep, stemmer.stemWords(keep) if stemmer is not None else keep))

    def seen_words(self) -> dict[str, str | None]:
        """The words this thread has analysed (since its memo last started over), each with its term (None for a
        stop word): a build's corpus vocabulary as its queries would meet it (retrievers/lexical.WORDS_FILE)."""
        return dict(self._memo())

    def _memo(self) -> dict[str, str | None]:
        memo = getattr(self._local, "memo", None)
        if memo is None:
            memo = self._local.memo = {}
        return memo

    def settings(self) -> dict[str, Any]:
        """What the manifest records; `Analyzer.from_settings` rebuilds the same analyzer."""
        return {
            "tokenizer": "unicode-word",
            "lowercase": True,
            "stopwords": self.stopwords,
            "stemmer": self.stemmer,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Analyzer:
        if settings.get("tokenizer", "unicode-word") != "unicode-word" or settings.get("lowercase", True) is not True:
            raise ValueError(f"unsupported analyzer settings: {settings}")
        return cls(stemmer=settings.get("stemmer"), stopwords=settings.get("stopwords"))

    def __repr__(self) -> str:
        return f"Analyzer(stemmer={self.stemmer!r}, stopwords={self.stopwords!r})"
