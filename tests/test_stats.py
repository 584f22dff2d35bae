"""Tests of metadcseg_jax/stats.py: the paired interval over seeds and test cases.

A hand-worked layout pins every formula; simulated two-way layouts check that the interval
covers the true difference about 95% of the time whichever part (seeds, test cases,
interaction) dominates, which fails if a part is dropped or a normal quantile replaces t.
"""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from metadcseg_jax import stats


def test_hand_worked_layout():
  # d = a − b = [[1, 2, 3], [3, 4, 5]]: seed means 2, 4 (variance 2, v_seed 2/2 = 1); case
  # means 2, 3, 4 (variance 1, v_test 1/3); residuals all zero (v_res 0). Var(D) = 4/3, the
  # seed part is over half of it, so ν = S − 1 = 1 and the half-width is t(0.975, 1)·√(4/3).
  a = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
  b = np.zeros_like(a)
  parts = stats.variance_parts(a - b)
  assert parts["seed"] == pytest.approx(1.0)
  assert parts["test"] == pytest.approx(1.0 / 3.0)
  assert parts["residual"] == pytest.approx(0.0, abs=1e-15)
  r = stats.paired_difference(a, b, resolve=None)
  half = scipy_stats.t.ppf(0.975, 1) * math.sqrt(4.0 / 3.0)
  assert r["mean"] == pytest.approx(3.0)
  assert (r["low"], r["high"]) == pytest.approx((3.0 - half, 3.0 + half))
  assert r["df"] == pytest.approx(1.0)
  assert r["se_seed"] == pytest.approx(1.0) and r["se_test"] == pytest.approx(math.sqrt(1 / 3))
  assert r["verdict"] == "not resolved"


def test_residual_mean_square_by_hand():
  # A 2x2 layout with an interaction: d = [[0, 2], [2, 0]]. Seed and case means are all 1, so
  # v_seed = v_test = 0; residuals ±1, MS_res = 4 / 1 = 4, v_res = 4 / 4 = 1.
  parts = stats.variance_parts(np.array([[0.0, 2.0], [2.0, 0.0]]))
  assert parts["seed"] == pytest.approx(0.0) and parts["test"] == pytest.approx(0.0)
  assert parts["residual"] == pytest.approx(1.0)


def test_verdicts():
  rng = np.random.default_rng(0)
  base = rng.normal(0.6, 0.1, (3, 200))
  ahead = stats.paired_difference(base + 0.05 + rng.normal(0, 0.01, base.shape), base)
  assert ahead["verdict"] == "ahead" and ahead["low"] > 0
  behind = stats.paired_difference(base, base + 0.05 + rng.normal(0, 0.01, base.shape))
  assert behind["verdict"] == "behind" and behind["high"] < 0
  tie = stats.paired_difference(base + rng.normal(0, 0.1, base.shape), base)
  assert tie["verdict"] == "not resolved"
  one = stats.paired_difference(base[:1] + 0.05, base[:1])
  assert one["verdict"] == "one seed" and one["low"] is None and one["se_seed"] is None
  with pytest.raises(ValueError, match="equal shapes"):
    stats.paired_difference(base, base[:2])


@pytest.mark.parametrize(
  "seeds,cases,sd_seed,sd_case,sd_noise",
  [
    (3, 100, 2.0, 5.0, 3.0),  # both parts matter
    (3, 100, 0.1, 5.0, 3.0),  # the test set dominates
    (3, 100, 3.0, 0.5, 1.0),  # the seeds dominate: t with 2 degrees of freedom
    (5, 60, 0.0, 0.0, 2.0),  # interaction only
  ],
)
def test_interval_covers_the_true_difference(seeds, cases, sd_seed, sd_case, sd_noise):
  rng = np.random.default_rng(seeds * 1000 + cases)
  reps, covered = 600, 0
  for _ in range(reps):
    d = (
      1.0
      + rng.normal(0, sd_seed, (seeds, 1))
      + rng.normal(0, sd_case, (1, cases))
      + rng.normal(0, sd_noise, (seeds, cases))
    )
    r = stats.paired_difference(d, np.zeros_like(d), resolve=None)
    covered += r["low"] <= 1.0 <= r["high"]
  assert 0.91 <= covered / reps <= 0.99


def test_seeds_to_resolve_matches_the_t_interval():
  # No test-set part, no interaction: the half-width at k seeds is t(k − 1)·σ/√k with σ² the
  # per-seed variance v_seed·S.
  parts = {
    "seed": 0.0004,
    "test": 0.0,
    "residual": 0.0,
    "df_seed": 2,
    "df_test": 99,
    "df_res": 198,
  }
  sigma = math.sqrt(0.0004 * 3)
  want = next(
    k for k in range(2, 1000) if scipy_stats.t.ppf(0.975, k - 1) * sigma / math.sqrt(k) < 0.02
  )
  assert stats.seeds_to_resolve(parts, 3, resolve=0.02) == want
  # A test-set part that alone exceeds the target cannot be resolved by seeds.
  assert stats.seeds_to_resolve(dict(parts, test=0.0004), 3, resolve=0.02) is None
