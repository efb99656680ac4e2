"""Score fusion: the C++ kernel (rag_service._native.fuse) against the NumPy reference, which is the specification.

The native tests fail, never skip, when the extension is not built: CI builds it. The NumPy-only fallback is tested in
test_native_backend.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rag_service.kernels import native, reference
from rag_service.kernels.reference import FusionResult, fuse_reference


def i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def native_fuse(ext, b_ids, b_scores, d_ids, d_scores, *, method, dense_weight, top_k, rrf_k=60.0) -> FusionResult:
    return FusionResult(*ext.fuse(b_ids, b_scores, d_ids, d_scores, method, dense_weight, top_k, rrf_k))


def assert_same(got: FusionResult, want: FusionResult) -> None:
    assert got.ids.dtype == np.int64 and got.scores.dtype == np.float32
    assert got.bm25.dtype == np.float32 and got.dense.dtype == np.float32
    np.testing.assert_array_equal(got.ids, want.ids)  # identical order, ties included
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got.bm25, want.bm25)  # raw scores, NaN where absent
    np.testing.assert_array_equal(got.dense, want.dense)


# --------------------------------------------------------------------------------------------------------------------
# Hand-computed cases: the reference says what the spec says
# --------------------------------------------------------------------------------------------------------------------

HAND_CASES = {
    # bm25 ids 1,2,3 scores 3,2,1 -> norm 1, .5, 0; dense ids 3,5 scores .9,.1 -> norm 1, 0; w = .5
    "weighted": (
        dict(b=([1, 2, 3], [3, 2, 1]), d=([3, 5], [0.9, 0.1]), method="weighted", dense_weight=0.5, top_k=10),
        ([1, 3, 2, 5], [0.5, 0.5, 0.25, 0.0], [3, 1, 2, np.nan], [np.nan, 0.9, np.nan, 0.1]),
    ),
    "rrf": (
        dict(b=([10, 20], [5, 4]), d=([20, 30], [0.8, 0.7]), method="rrf", dense_weight=0.5, top_k=10),
        ([20, 10, 30], [0.5 / 62 + 0.5 / 61, 0.5 / 61, 0.5 / 62], [4, 5, np.nan], [0.8, np.nan, 0.7]),
    ),
    # disjoint lists, equal weights: rank r of one list ties rank r of the other; ties go to the smaller id
    "rrf_tie_by_id": (
        dict(b=([5, 9], [2, 1]), d=([3, 7], [2, 1]), method="rrf", dense_weight=0.5, top_k=3),
        ([3, 5, 7], [0.5 / 61, 0.5 / 61, 0.5 / 62], [np.nan, 2, np.nan], [2, np.nan, 1]),
    ),
    # all-equal scores normalise to 1.0; w = 0 ignores the dense list (its ids still appear with fused 0)
    "all_equal_w0": (
        dict(b=([4, 2], [7, 7]), d=([8], [3]), method="weighted", dense_weight=0.0, top_k=5),
        ([2, 4, 8], [1.0, 1.0, 0.0], [7, 7, np.nan], [np.nan, np.nan, 3]),
    ),
    "dense_only_w1": (
        dict(b=([], []), d=([8, 6], [0.5, 0.25]), method="weighted", dense_weight=1.0, top_k=1),
        ([8], [1.0], [np.nan], [0.5]),
    ),
    "empty": (
        dict(b=([], []), d=([], []), method="rrf", dense_weight=0.5, top_k=10),
        ([], [], [], []),
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_CASES))
@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_hand_computed(name, backend, ext):
    args, (ids, scores, bm25, dense) = HAND_CASES[name]
    got = native.fuse(i64(args["b"][0]), f32(args["b"][1]), i64(args["d"][0]), f32(args["d"][1]),
                      method=args["method"], dense_weight=args["dense_weight"], top_k=args["top_k"], backend=backend)
    assert_same(got, FusionResult(i64(ids), f32(scores), f32(bm25), f32(dense)))


# --------------------------------------------------------------------------------------------------------------------
# Native == reference on seeded random inputs
# --------------------------------------------------------------------------------------------------------------------

SIZES = [0, 1, 2, 3, 7, 10, 64, 100, 257, 1000]


def random_scores(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "normal":
        scores = rng.normal(scale=rng.choice([1e-3, 1.0, 30.0]), size=n)
    elif kind == "integer":  # heavy ties
        scores = rng.integers(0, 4, size=n).astype(np.float64)
    elif kind == "equal":
        scores = np.full(n, rng.choice([0.0, 1.5, -2.0]))
    else:  # a few distinct values, as a quantised dense score would give
        scores = rng.choice([0.25, 0.5, 0.75], size=n)
    if rng.random() < 0.7:  # usually in rank order (best first), as retrievers return them
        scores = -np.sort(-scores)
    return scores.astype(np.float32)


def random_ids(rng: np.random.Generator, n1: int, n2: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    if layout == "disjoint":
        pool = rng.permutation(4 * (n1 + n2) + 4)
        return pool[:n1].astype(np.int64), pool[n1:n1 + n2].astype(np.int64)
    if layout == "same":  # the dense list re-ranks (a prefix of) the bm25 list
        b = rng.choice(10 * n1 + 10, size=n1, replace=False).astype(np.int64)
        return b, rng.permutation(b)[:n2]
    if layout == "extreme":  # negative and huge ids: the hash must not care
        space = np.array([np.iinfo(np.int64).min, -1, 0, 1, np.iinfo(np.int64).max], dtype=np.int64)
        space = np.unique(np.concatenate([space, rng.integers(-2**62, 2**62, size=n1 + n2 + 5)]))
        return rng.choice(space, size=n1, replace=False), rng.choice(space, size=n2, replace=False)
    space = max(n1, n2) * int(rng.choice([1, 2, 10])) + 1  # overlapping, more or less
    return (rng.choice(space, size=n1, replace=False).astype(np.int64),
            rng.choice(space, size=n2, replace=False).astype(np.int64))


def random_case(rng: np.random.Generator) -> dict:
    n1, n2 = int(rng.choice(SIZES)), int(rng.choice(SIZES))
    layout = str(rng.choice(["overlap", "disjoint", "same", "extreme"]))
    if layout == "same":
        n2 = min(n1, n2)
    b_ids, d_ids = random_ids(rng, n1, n2, layout)
    kinds = ["normal", "integer", "equal", "few"]
    return dict(
        b_ids=b_ids, b_scores=random_scores(rng, n1, str(rng.choice(kinds))),
        d_ids=d_ids, d_scores=random_scores(rng, n2, str(rng.choice(kinds))),
        method=str(rng.choice(["rrf", "weighted"])),
        dense_weight=float(rng.choice([0.0, 1.0, 0.5, 0.3, 0.7, rng.random()])),
        top_k=int(rng.choice([1, 3, 10, 100, n1 + n2, n1 + n2 + 5, 10**9])) or 1,
        rrf_k=float(rng.choice([60.0, 1.0, 0.5, 1000.0])),
    )


@pytest.mark.parametrize("seed", range(8))
def test_native_matches_reference_random(seed, ext):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        case = random_case(rng)
        args = (case["b_ids"], case["b_scores"], case["d_ids"], case["d_scores"])
        params = dict(method=case["method"], dense_weight=case["dense_weight"], top_k=case["top_k"],
                      rrf_k=case["rrf_k"])
        want = fuse_reference(*args, **params)
        union = np.union1d(case["b_ids"], case["d_ids"]).size
        assert want.ids.size == min(case["top_k"], union)
        assert_same(native_fuse(ext, *args, **params), want)
        assert_same(native.fuse(*args, **params, backend="cpp"), want)
        assert_same(native.fuse(*args, **params, backend="numpy"), want)


@pytest.mark.parametrize("method", ["rrf", "weighted"])
@pytest.mark.parametrize("dense_weight", [0.0, 0.5, 1.0])
def test_heavy_ties_same_order(method, dense_weight, ext):
    """Integer-valued, all-equal and mirrored scores make many fused values equal; the id order must be identical."""
    rng = np.random.default_rng(1234)
    n = 500
    ids = rng.permutation(2 * n).astype(np.int64)
    cases = [
        (ids[:n], np.full(n, 3.0, np.float32), ids[n:], np.full(n, 3.0, np.float32)),         # all equal, disjoint
        (ids[:n], rng.integers(0, 3, n).astype(np.float32), ids[n // 2:n + n // 2],
         rng.integers(0, 3, n).astype(np.float32)),                                           # integers, half overlap
        (ids[:n], np.arange(n, 0, -1).astype(np.float32), ids[n:], np.arange(n, 0, -1).astype(np.float32)),  # mirrored
        (ids[:n], np.ones(n, np.float32), ids[:n][::-1].copy(), np.ones(n, np.float32)),       # same ids, reversed
    ]
    for b_ids, b_scores, d_ids, d_scores in cases:
        for top_k in (1, 7, n, 3 * n):
            params = dict(method=method, dense_weight=dense_weight, top_k=top_k)
            want = fuse_reference(b_ids, b_scores, d_ids, d_scores, **params)
            got = native_fuse(ext, b_ids, b_scores, d_ids, d_scores, **params)
            assert_same(got, want)
            # ties really are broken by id ascending
            s, i = want.scores.astype(np.float64), want.ids
            assert np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (i[:-1] < i[1:])))


def test_top_k_is_a_prefix_of_the_full_ranking(ext):
    rng = np.random.default_rng(7)
    b_ids, d_ids = random_ids(rng, 300, 300, "overlap")
    b_scores = random_scores(rng, 300, "integer")
    d_scores = random_scores(rng, 300, "few")
    full = native_fuse(ext, b_ids, b_scores, d_ids, d_scores, method="weighted", dense_weight=0.4, top_k=10**6)
    for top_k in (1, 2, 10, 37, 100, full.ids.size - 1):
        part = native_fuse(ext, b_ids, b_scores, d_ids, d_scores, method="weighted", dense_weight=0.4, top_k=top_k)
        assert_same(part, FusionResult(*(a[:top_k] for a in full)))


def test_empty_union_returns_four_empty_arrays(ext):
    empty_ids, empty_scores = i64([]), f32([])
    for fuse in (lambda *a, **k: native_fuse(ext, *a, **k), fuse_reference):
        got = fuse(empty_ids, empty_scores, empty_ids, empty_scores, method="rrf", dense_weight=0.5, top_k=5)
        assert [a.shape for a in got] == [(0,)] * 4
        assert [a.dtype for a in got] == [np.int64, np.float32, np.float32, np.float32]


def test_native_outputs_are_fresh_arrays(ext):
    """The returned arrays own their memory (a capsule-held buffer), not views into a larger array, and are
    independent of the inputs."""
    b_ids, b_scores = i64([1, 2, 3]), f32([3, 2, 1])
    got = native_fuse(ext, b_ids, b_scores, i64([]), f32([]), method="weighted", dense_weight=0.5, top_k=2)
    for array in got:
        assert array.flags.c_contiguous and array.flags.writeable
        assert not isinstance(array.base, np.ndarray)
    got.ids[0] = 99
    assert b_ids[0] == 1


def test_facade_converts_lenient_inputs(ext):
    """The facade converts lists, other int/float dtypes and strided views; the C++ boundary itself stays strict."""
    b_ids = np.arange(20, dtype=np.int32)[::2]
    b_scores = np.linspace(5, 1, 20)[::2]  # float64, strided
    want = fuse_reference(b_ids.astype(np.int64), b_scores.astype(np.float32), i64([4, 99]), f32([0.5, 0.25]),
                          method="weighted", dense_weight=0.5, top_k=5)
    for backend in ("cpp", "numpy"):
        got = native.fuse(b_ids, b_scores, [4, 99], [0.5, 0.25], method="weighted", dense_weight=0.5, top_k=5,
                          backend=backend)
        assert_same(got, want)


def test_concurrent_calls_agree(ext):
    """Compute runs without the GIL; concurrent calls must not interfere."""
    rng = np.random.default_rng(99)
    cases = [random_case(rng) for _ in range(16)]
    wanted = [fuse_reference(c["b_ids"], c["b_scores"], c["d_ids"], c["d_scores"], method=c["method"],
                             dense_weight=c["dense_weight"], top_k=c["top_k"], rrf_k=c["rrf_k"]) for c in cases]
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                for c, want in zip(cases, wanted):
                    assert_same(native_fuse(ext, c["b_ids"], c["b_scores"], c["d_ids"], c["d_scores"],
                                            method=c["method"], dense_weight=c["dense_weight"], top_k=c["top_k"],
                                            rrf_k=c["rrf_k"]), want)
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


# --------------------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, from the native function, the reference and the facade
# --------------------------------------------------------------------------------------------------------------------

def good_args() -> dict:
    return dict(bm25_ids=i64([1, 2, 3]), bm25_scores=f32([3.0, 2.0, 1.0]), dense_ids=i64([3, 4]),
                dense_scores=f32([0.9, 0.1]), method="weighted", dense_weight=0.5, top_k=3, rrf_k=60.0)


# (case, changes to good_args(), the argument the message must name). Valid for every entry point.
BAD_SEMANTIC = [
    ("2-D ids", dict(bm25_ids=i64([[1, 2, 3]])), "bm25_ids"),
    ("2-D scores", dict(dense_scores=f32([[0.9], [0.1]])), "dense_scores"),
    ("0-D ids", dict(dense_ids=np.int64(3)), "dense_ids"),
    ("length mismatch bm25", dict(bm25_scores=f32([3.0, 2.0])), "bm25_scores"),
    ("length mismatch dense", dict(dense_ids=i64([3, 4, 5])), "dense_ids"),
    ("NaN score", dict(bm25_scores=f32([3.0, np.nan, 1.0])), "bm25_scores"),
    ("inf score", dict(dense_scores=f32([np.inf, 0.1])), "dense_scores"),
    ("-inf score", dict(bm25_scores=f32([3.0, 2.0, -np.inf])), "bm25_scores"),
    ("duplicate bm25 id", dict(bm25_ids=i64([1, 2, 1])), "bm25_ids"),
    ("duplicate dense id", dict(dense_ids=i64([4, 4])), "dense_ids"),
    ("duplicate dense id also in bm25", dict(dense_ids=i64([3, 3])), "dense_ids"),
    ("unknown method", dict(method="sum"), "method"),
    ("method is case-sensitive", dict(method="RRF"), "method"),
    ("weight < 0", dict(dense_weight=-0.1), "dense_weight"),
    ("weight > 1", dict(dense_weight=1.5), "dense_weight"),
    ("weight NaN", dict(dense_weight=float("nan")), "dense_weight"),
    ("top_k 0", dict(top_k=0), "top_k"),
    ("top_k negative", dict(top_k=-3), "top_k"),
    ("rrf_k 0", dict(rrf_k=0.0), "rrf_k"),
    ("rrf_k negative", dict(rrf_k=-1.0), "rrf_k"),
    ("rrf_k NaN", dict(rrf_k=float("nan")), "rrf_k"),
    ("rrf_k inf", dict(rrf_k=float("inf")), "rrf_k"),
]

# Layout/dtype problems: the strict boundaries reject them (the facade converts them instead).
BAD_STRICT = [
    ("int32 ids", dict(bm25_ids=np.array([1, 2, 3], dtype=np.int32)), "bm25_ids"),
    ("uint64 ids", dict(dense_ids=np.array([3, 4], dtype=np.uint64)), "dense_ids"),
    ("float ids", dict(dense_ids=np.array([3.0, 4.0])), "dense_ids"),
    ("float64 scores", dict(bm25_scores=np.array([3.0, 2.0, 1.0])), "bm25_scores"),
    ("float16 scores", dict(dense_scores=np.array([0.9, 0.1], dtype=np.float16)), "dense_scores"),
    ("big-endian ids", dict(bm25_ids=np.array([1, 2, 3], dtype=">i8")), "bm25_ids"),
    ("list, not ndarray", dict(bm25_ids=[1, 2, 3]), "bm25_ids"),
]

NON_CONTIGUOUS = ("non-contiguous", dict(bm25_scores=f32([3.0, 0, 2.0, 0, 1.0, 0])[::2]), "bm25_scores")


def call_native(ext, a: dict):
    return ext.fuse(a["bm25_ids"], a["bm25_scores"], a["dense_ids"], a["dense_scores"], a["method"],
                    a["dense_weight"], a["top_k"], a["rrf_k"])


def call_reference(a: dict):
    return fuse_reference(a["bm25_ids"], a["bm25_scores"], a["dense_ids"], a["dense_scores"], method=a["method"],
                          dense_weight=a["dense_weight"], top_k=a["top_k"], rrf_k=a["rrf_k"])


def call_facade(a: dict, backend: str):
    return native.fuse(a["bm25_ids"], a["bm25_scores"], a["dense_ids"], a["dense_scores"], method=a["method"],
                       dense_weight=a["dense_weight"], top_k=a["top_k"], rrf_k=a["rrf_k"], backend=backend)


def test_good_args_are_good(ext):
    want = call_reference(good_args())
    assert_same(FusionResult(*call_native(ext, good_args())), want)
    assert_same(call_facade(good_args(), "cpp"), want)


@pytest.mark.parametrize("case, change, name", [*BAD_SEMANTIC, *BAD_STRICT, NON_CONTIGUOUS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_native_rejects(case, change, name, ext):
    with pytest.raises(ValueError, match=name):
        call_native(ext, {**good_args(), **change})


@pytest.mark.parametrize("case, change, name", [*BAD_SEMANTIC, *BAD_STRICT],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_reference_rejects(case, change, name):
    with pytest.raises(ValueError, match=name):
        call_reference({**good_args(), **change})


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("case, change, name", BAD_SEMANTIC, ids=lambda v: v if isinstance(v, str) else "")
def test_facade_rejects(case, change, name, backend, ext):
    with pytest.raises(ValueError, match=name):
        call_facade({**good_args(), **change}, backend)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("change, name", [
    (dict(bm25_ids=np.array([1.5, 2.0, 3.0])), "bm25_ids"),           # would truncate
    (dict(dense_ids=np.array(["a", "b"])), "dense_ids"),
    (dict(dense_scores=np.array(["x", "y"])), "dense_scores"),
    (dict(bm25_scores=np.array([1e300, 2.0, 1.0])), "bm25_scores"),  # overflows float32
    (dict(dense_ids=np.array([3, 2**64 - 1], dtype=np.uint64)), "dense_ids"),
])
def test_facade_rejects_unconvertible(change, name, backend, ext):
    with pytest.raises(ValueError, match=name):
        call_facade({**good_args(), **change}, backend)


def test_native_and_reference_report_the_same_problem(ext):
    """Same check order and the same message for the semantic errors (the C++ checks mirror the reference)."""
    for case, change, _name in BAD_SEMANTIC:
        if case.startswith(("2-D", "0-D")):
            continue  # shapes are worded alike but checked by different layers
        args = {**good_args(), **change}
        with pytest.raises(ValueError) as from_native:
            call_native(ext, args)
        with pytest.raises(ValueError) as from_reference:
            call_reference(args)
        assert str(from_native.value) == str(from_reference.value), case


def test_reference_module_exports():
    assert reference.FusionResult is native.FusionResult
    assert set(reference.FUSION_METHODS) == {"rrf", "weighted"}
