"""Words that turn a question around without changing its topic: negation, direction, comparison and quantity.

The semantic cache serves an earlier query's contexts when two queries embed alike and retrieve alike. Two claims that
differ in one of these words ("X increases Y" / "X reduces Y", "larger" / "smaller", "fewer" / "more", "not") embed at
cosine 0.98-0.99 and share nearly every BM25 term, yet a fresh search ranks other evidence for them. Neither half of
the rest of the guard sees it: the embedding barely moves, and BM25 drops some of these words as stop words ("not",
"no") and weighs others little because the corpus uses them everywhere ("more", "higher", "increased"). So the guard
compares the words themselves: the two queries must hold the same ones (stemmed, with repeats), and the same numbers.

English only: an index in another language should turn this check off (CacheConfig.guard_polarity_words); the
content-word check (cache.differing_idf) works with any analyzer.
"""

from __future__ import annotations

import re

from rag_service.retrievers.analysis import Analyzer

NEGATION = (
    "not no never none nor neither nobody nothing nowhere without cannot lack lacks lacking lacked absent absence "
    "fail fails failed failure unable non"
)
DIRECTION = (
    "increase increases increased increasing decrease decreases decreased decreasing reduce reduces reduced reducing "
    "reduction raise raises raised rise rises rising elevate elevated elevation decline declines declined drop drops "
    "dropped fall falls fell gain gains loss losses lose loses lost boost boosts enhance enhances enhanced improve "
    "improves improved improvement worsen worsens worsened impair impairs impaired inhibit inhibits inhibited "
    "inhibition suppress suppresses suppressed promote promotes promoted induce induces induced stimulate stimulates "
    "activate activates activated block blocks blocked upregulate upregulates upregulated downregulate "
    "downregulates downregulated up down positive positively negative negatively benefit benefits beneficial harm "
    "harmful protect protects protective prevent prevents prevented cause causes caused accelerate accelerates "
    "slow slows delay delays attenuate attenuates augment augments diminish diminishes exacerbate exacerbates "
    "alleviate alleviates amplify amplifies deplete depletes depleted restore restores"
)
COMPARISON = (
    "more less fewer greater larger smaller bigger higher lower better worse best worst most least than same similar "
    "different differ differs equal exceed exceeds superior inferior longer shorter faster slower stronger weaker "
    "earlier later before after above below over under high low large small"
)
QUANTITY = (
    "all every each some any few many much several only majority minority half double twice triple single multiple "
    "both either zero one two three four five six seven eight nine ten hundred thousand million billion percent "
    "first second third once"
)

# Stemmed and without stop-word removal, so "not" and "no" survive and inflections meet ("increases" = "increased").
_ANALYZER = Analyzer(stemmer="english", stopwords=None)
WORDS: frozenset[str] = frozenset(_ANALYZER.tokens(" ".join((NEGATION, DIRECTION, COMPARISON, QUANTITY))))
# "doesn't" tokenises to "doesn" + "t": the contraction is a negation.
_NT = re.compile(r"n['\u2019]t\b", re.IGNORECASE)


def polarity_words(query: str) -> tuple[str, ...]:
    """The query's negation, direction, comparison and quantity words and its numbers, stemmed, sorted, with repeats:
    two queries that may share an answer have equal tuples."""
    return tuple(sorted(t for t in _ANALYZER.tokens(_NT.sub(" not", query)) if t in WORDS or t.isdigit()))


__all__ = ["polarity_words", "WORDS", "NEGATION", "DIRECTION", "COMPARISON", "QUANTITY"]
