"""FeatureRow: the reranker's features of one context as a view over its row, read like the dict it replaces."""

import numpy as np
import pytest

from rag_service.core.params import FeatureRow
from rag_service.search.rerank import FEATURES, Reranked


def test_a_row_reads_like_the_dict_of_its_names_and_values():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((4, len(FEATURES))).astype(np.float32)
    reranked = Reranked(ids=np.arange(4), scores=np.zeros(4, np.float32), features=rows, order=np.arange(4))
    for i in range(4):
        view = reranked.feature_dict(i)
        expected = {name: float(v) for name, v in zip(FEATURES, rows[i].tolist())}
        assert view == expected and dict(view) == expected
        assert list(view) == list(FEATURES) and len(view) == len(FEATURES)
        assert list(view.values()) == list(expected.values())
        assert view["dense"] == expected["dense"]
    with pytest.raises(KeyError):
        reranked.feature_dict(0)["no such feature"]


def test_names_and_values_must_pair_up():
    with pytest.raises(ValueError, match="2 feature names for 3 values"):
        FeatureRow(("a", "b"), [1.0, 2.0, 3.0])
