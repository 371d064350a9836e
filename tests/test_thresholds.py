"""Thresholds against numpy on generated scores: every rule, both directions, both selection paths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detectors.base import calibration_stats
from jobs.thresholds import (
    RankSearch,
    Rule,
    TailBuffer,
    ThresholdError,
    fit_threshold,
)


def _scores(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=n)
    if kind == "lognormal32":  # like recon_error: float32, skewed
        return rng.lognormal(size=n).astype(np.float32)
    if kind == "ties":  # many duplicates: the order statistics sit inside long runs
        return np.round(rng.normal(size=n), 1)
    raise AssertionError(kind)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


KINDS = ["normal", "lognormal32", "ties"]
# max_values small forces the histogram refinement (RankSearch); large keeps the one-pass tail
PATHS = {"tail": 2**21, "refine": 64}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["high", "low"])
@pytest.mark.parametrize("q", [0.999, 0.99, 0.5, 0.01])  # 0.01: a level on the other side of the score
@pytest.mark.parametrize("path", list(PATHS))
def test_quantile_equals_numpy(kind: str, direction: str, q: float, path: str) -> None:
    x = _scores(kind, 20_011)
    t = fit_threshold("s", x, f"quantile:{q}", direction, batch_size=997, max_values=PATHS[path])  # type: ignore[arg-type]
    expected = float(np.quantile(x.astype(np.float64), q if direction == "high" else 1 - q))
    assert _rel(t.value, expected) < 1e-6
    assert t.n == len(x) and t.direction == direction and t.rule == f"quantile:{q:g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["high", "low"])
@pytest.mark.parametrize("path", list(PATHS))
def test_iqr_equals_numpy(kind: str, direction: str, path: str) -> None:
    x = _scores(kind, 10_007, seed=1)
    t = fit_threshold("s", x, "iqr", direction, batch_size=1000, max_values=PATHS[path])  # type: ignore[arg-type]
    q1, q3 = np.quantile(x.astype(np.float64), [0.25, 0.75])
    expected = q3 + 1.5 * (q3 - q1) if direction == "high" else q1 - 1.5 * (q3 - q1)
    assert _rel(t.value, expected) < 1e-6
    assert _rel(t.details["q1"], q1) < 1e-6 and _rel(t.details["q3"], q3) < 1e-6
    t2 = fit_threshold("s", x, "iqr:3", direction)  # type: ignore[arg-type]
    expected2 = q3 + 3 * (q3 - q1) if direction == "high" else q1 - 3 * (q3 - q1)
    assert _rel(t2.value, expected2) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["high", "low"])
def test_sigma_equals_numpy(kind: str, direction: str) -> None:
    x = _scores(kind, 30_001, seed=2) + 1000.0  # an offset: the streaming variance must not cancel
    for k in (3.0, 2.0):
        t = fit_threshold("s", x, f"sigma:{k:g}", direction, batch_size=4096)  # type: ignore[arg-type]
        x64 = x.astype(np.float64)
        expected = x64.mean() + (k if direction == "high" else -k) * x64.std()
        assert _rel(t.value, expected) < 1e-9
        assert _rel(t.details["std"], float(x64.std())) < 1e-9


@pytest.mark.parametrize("direction", ["high", "low"])
def test_calibrated_uses_the_bundle_statistics(direction: str) -> None:
    normal = np.random.default_rng(3).normal(size=5000)
    cal = {"recon_error": calibration_stats(normal)}
    run = np.random.default_rng(4).normal(loc=1.0, size=300)  # this run's scores do not matter
    t = fit_threshold("recon_error", run, "calibrated", direction, calibration=cal)  # type: ignore[arg-type]
    level = 0.999 if direction == "high" else 0.001
    assert t.value == pytest.approx(float(np.quantile(normal, level)), rel=1e-12)
    assert t.n == 5000
    t99 = fit_threshold("recon_error", run, "calibrated:0.99", direction, calibration=cal)  # type: ignore[arg-type]
    assert t99.value == pytest.approx(float(np.quantile(normal, 0.99 if direction == "high" else 0.01)), rel=1e-12)


@pytest.mark.parametrize("direction", ["high", "low"])
def test_f1_threshold_is_the_best_f1(direction: str) -> None:
    rng = np.random.default_rng(5)
    n, n_anom = 3000, 60
    y = np.zeros(n, bool)
    y[:n_anom] = True
    shift = 2.5 if direction == "high" else -2.5
    x = rng.normal(size=n) + np.where(y, shift, 0.0)
    labels = y.astype(np.int8)
    labels[n_anom : n_anom + 500] = -1  # unknown labels are left out
    t = fit_threshold("s", x, "f1", direction, labels=labels, batch_size=700)  # type: ignore[arg-type]
    known = labels >= 0
    xs, ys = x[known], y[known]

    def f1(flags: np.ndarray) -> float:
        tp = int((flags & ys).sum())
        return 2 * tp / (int(flags.sum()) + int(ys.sum())) if tp else 0.0

    best = max(f1(xs >= c) if direction == "high" else f1(xs <= c) for c in np.unique(xs))
    assert f1(t.beyond(xs)) == pytest.approx(best, abs=1e-12)
    assert t.details["f1"] == pytest.approx(best, abs=1e-12)
    assert t.n == int(known.sum())


def test_beyond_is_strict_and_never_nan() -> None:
    t = fit_threshold("s", np.arange(1000.0), "quantile:0.99", "high")
    assert t.value == pytest.approx(989.01)
    flags = t.beyond(np.array([989.01, 989.02, np.nan, 2000.0]))
    assert flags.tolist() == [False, True, False, True]
    low = fit_threshold("s", np.arange(1000.0), "quantile:0.99", "low")
    assert low.beyond(np.array([low.value, low.value - 1e-9, np.nan])).tolist() == [False, True, False]


def test_nan_scores_are_ignored() -> None:
    x = _scores("normal", 5000)
    with_nan = np.concatenate([x, np.full(100, np.nan), np.array([np.inf])])
    assert (
        fit_threshold("s", with_nan, "quantile:0.99", "high").value
        == fit_threshold("s", x, "quantile:0.99", "high").value
    )


# -- refusals: a clear one-line message, never a silent fallback


@pytest.mark.parametrize(
    ("values", "rule", "message"),
    [
        (np.arange(999.0), "quantile:0.999", "needs at least 1000 scores"),
        (np.arange(99.0), "quantile:0.99", "needs at least 100 scores"),
        (np.full(5000, 0.25), "quantile:0.99", "all 5000 scores are equal"),
        (np.full(5000, 0.25), "sigma", "all 5000 scores are equal"),
        (np.full(5000, 0.25), "iqr", "all 5000 scores are equal"),
        (np.array([np.nan] * 10), "sigma", "no valid scores"),
    ],
)
def test_refusals(values: np.ndarray, rule: str, message: str) -> None:
    with pytest.raises(ThresholdError, match=message) as e:
        fit_threshold("recon_error", values, rule, "high")
    assert "\n" not in str(e.value) and "recon_error" in str(e.value)


def test_quantile_accepts_exactly_enough_scores() -> None:
    x = np.arange(1000.0)
    assert fit_threshold("s", x, "quantile:0.999", "high").value == pytest.approx(np.quantile(x, 0.999))


def test_f1_refuses_without_labelled_anomalies() -> None:
    x = _scores("normal", 500)
    with pytest.raises(ThresholdError, match="needs known anomalies"):
        fit_threshold("s", x, "f1", "high", labels=np.zeros(500, np.int8))
    with pytest.raises(ThresholdError, match="needs labelled rows"):
        fit_threshold("s", x, "f1", "high", labels=np.full(500, -1, np.int8))


def test_calibrated_refuses_without_calibration() -> None:
    x = _scores("normal", 500)
    with pytest.raises(ThresholdError, match="no calibration statistics for gmm_loglik"):
        fit_threshold("gmm_loglik", x, "calibrated", "low", calibration={})
    cal = {"gmm_loglik": calibration_stats(x)}
    with pytest.raises(ThresholdError, match=r"not 0\.9"):
        fit_threshold("gmm_loglik", x, "calibrated:0.9", "high", calibration=cal)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("median", "Unknown threshold rule"),
        ("quantile:1.5", "0 < Q < 1"),
        ("quantile:x", "expects a number"),
        ("sigma:-1", "K > 0"),
        ("f1:3", "no parameter"),
    ],
)
def test_rule_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rule.parse(text)


def test_rule_defaults() -> None:
    assert Rule.parse("quantile") == Rule("quantile", 0.999)
    assert Rule.parse("sigma") == Rule("sigma", 3.0)
    assert Rule.parse("iqr") == Rule("iqr", 1.5)
    assert str(Rule.parse("calibrated")) == "calibrated:0.999"


# -- the selection pieces on their own


def _search(x: np.ndarray, ranks: list[int], batch: int = 3001, **kw: int) -> RankSearch:
    search = RankSearch(**kw)
    while True:
        for start in range(0, len(x), batch):
            search.feed(x[start : start + batch])
        if search.passes == 0:
            search.end_first_pass(ranks)
        else:
            search.end_pass()
        if search.done:
            return search


@pytest.mark.parametrize("kind", [*KINDS, "signed"])
def test_rank_search_finds_exact_order_statistics(kind: str) -> None:
    x = _scores(kind if kind != "signed" else "normal", 50_000, seed=7).astype(np.float64)
    if kind == "signed":  # negative and positive values, zeros of both signs, a huge and a tiny one
        x[:4] = [0.0, -0.0, 1e300, -1e-300]
    srt = np.sort(x)
    ranks = [0, 1, 17, 12_345, 25_000, 49_998, 49_999]
    search = _search(x, ranks, root_bits=8, bits=4, max_values=100)
    assert search.found == {r: float(srt[r]) for r in ranks}
    assert search.passes >= 3  # refined at least once with these tiny histograms


def test_rank_search_on_one_value_repeated() -> None:
    x = np.concatenate([np.full(10_000, 0.1), np.ones(3), -np.ones(3)])
    search = _search(x, [5000, 10_005], root_bits=4, bits=4, max_values=10)
    assert search.found == {5000: 0.1, 10_005: 1.0}
    assert search.passes <= 1 + 64 // 4  # every refinement narrows the keys 16-fold


def test_order_keys_keep_the_order() -> None:
    from jobs.thresholds import key_value, order_keys

    x = np.array([-np.inf, -1e308, -2.5, -1e-320, -0.0, 0.0, 1e-320, 3.0, 1e308, np.inf])
    keys = order_keys(x)
    assert (np.diff(keys.astype(object)) > 0).all()
    assert [key_value(int(k)) for k in keys] == x.tolist()


def test_tail_buffer_keeps_the_extremes() -> None:
    rng = np.random.default_rng(8)
    x = rng.integers(0, 50, size=10_000).astype(np.float64)  # many ties at the bound
    for side in ("high", "low"):
        buf = TailBuffer(123, side)  # type: ignore[arg-type]
        for start in range(0, len(x), 77):
            buf.feed(x[start : start + 77])
        expected = np.sort(x)[-123:] if side == "high" else np.sort(x)[:123]
        np.testing.assert_array_equal(buf.sorted(), expected)
    assert math.isfinite(float(buf.sorted()[0]))


def test_calibrated_does_not_depend_on_this_runs_scores() -> None:
    cal = {"s": calibration_stats(np.random.default_rng(1).normal(size=1000))}
    same = fit_threshold("s", np.full(50, 0.5), "calibrated:0.99", "high", calibration=cal)
    other = fit_threshold("s", np.arange(5000.0), "calibrated:0.99", "high", calibration=cal)
    assert same.value == other.value == cal["s"]["quantiles"]["0.99"]
