"""Tests of metadcseg_jax/benchmark/stats.py: the paired interval over seeds and test cases.

Hand-worked layouts, with and without residuals, pin every formula (the parts, Var(D), the
Satterthwaite degrees of freedom, the S − 1 rule's key, the t quantile); simulated two-way
layouts check that the interval covers the true difference about 95% of the time whichever
part (seeds, test cases, interaction) dominates, and that the power figure predicts how often
a true gap is called ahead.
"""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from metadcseg_jax.benchmark import stats


def _anova_by_loops(d):
  """(v_seed, v_test, v_res) of a list-of-lists layout, by explicit sums: independent of the
  implementation's vectorised version."""
  s, n = len(d), len(d[0])
  seed_mean = [sum(row) / n for row in d]
  case_mean = [sum(d[k][i] for k in range(s)) / s for i in range(n)]
  grand = sum(seed_mean) / s
  ss_seed = sum((m - grand) ** 2 for m in seed_mean)
  ss_case = sum((m - grand) ** 2 for m in case_mean)
  ss_res = 0.0
  for k in range(s):
    for i in range(n):
      ss_res += (d[k][i] - seed_mean[k] - case_mean[i] + grand) ** 2
  v_seed = ss_seed / (s - 1) / s
  v_test = ss_case / (n - 1) / n
  v_res = ss_res / ((s - 1) * (n - 1)) / (s * n)
  return v_seed, v_test, v_res


def _satterthwaite(v_seed, v_test, v_res, s, n):
  var = v_seed + v_test - v_res
  return var * var / (v_seed**2 / (s - 1) + v_test**2 / (n - 1) + v_res**2 / ((s - 1) * (n - 1)))


def test_hand_worked_layout_with_an_interaction():
  # d = a − b, 3 seeds x 4 cases:
  #   [[0, 1, 3, 0],      seed means 1, 2, 4 (grand 7/3): Var_s = 7/3, v_seed = 7/9
  #    [2, 1, 5, 0],      case means 2/3, 8/3, 14/3, 4/3: Var_i = 28/9, v_test = 7/9
  #    [0, 6, 6, 4]]      residuals [[2, -1, -1, 0], [5, -4, 2, -3], [-7, 5, -1, 3]] / 3:
  #                       SS_res = 144/9 = 16, MS_res = 16/6 = 8/3, v_res = (8/3)/12 = 2/9.
  # Var(D) = 7/9 + 7/9 − 2/9 = 4/3. Satterthwaite: (16/9) / ((7/9)²/2 + (7/9)²/3 + (2/9)²/6)
  # = (16/9) / (249/486) = 288/83 ≈ 3.47. The seed component v_seed − v_res = 5/9 is under half
  # of Var(D) (2/3), so the S − 1 rule does not fire; keyed on v_seed (7/9 ≥ 2/3) it would,
  # and ν would drop to 2.
  d = [[0.0, 1.0, 3.0, 0.0], [2.0, 1.0, 5.0, 0.0], [0.0, 6.0, 6.0, 4.0]]
  v_seed, v_test, v_res = _anova_by_loops(d)
  assert (v_seed, v_test, v_res) == pytest.approx((7 / 9, 7 / 9, 2 / 9))
  assert _satterthwaite(v_seed, v_test, v_res, 3, 4) == pytest.approx(288 / 83)
  b = np.array([[0.5, 0.25, 0.75, 0.5]] * 3)  # any common reference: only a − b matters
  a = b + np.array(d)
  parts = stats.variance_parts(a - b)
  assert parts["seed"] == pytest.approx(7 / 9)
  assert parts["test"] == pytest.approx(7 / 9)
  assert parts["residual"] == pytest.approx(2 / 9)
  assert (parts["df_seed"], parts["df_test"], parts["df_res"]) == (2, 3, 6)
  var, df = stats.combine(parts)
  assert var == pytest.approx(4 / 3)
  assert df == pytest.approx(288 / 83)
  r = stats.paired_difference(a, b, resolve=None)
  half = scipy_stats.t.ppf(0.975, 288 / 83) * math.sqrt(4 / 3)
  assert r["mean"] == pytest.approx(7 / 3)
  assert r["df"] == pytest.approx(288 / 83)
  assert (r["low"], r["high"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))
  assert (r["se_seed"], r["se_test"]) == pytest.approx((math.sqrt(7 / 9), math.sqrt(7 / 9)))
  assert r["verdict"] == "not resolved"  # t(0.975, 3.47) = 2.95: 7/3 ± 3.41


def test_the_s_minus_1_rule_fires_on_the_seed_component():
  # d, 3 seeds x 4 cases: [[9, 7, 8, 6], [4, 5, 0, 3], [4, 8, 3, 3]]. Seed means 7.5, 3, 4.5
  # (grand 5): Var_s = 21/4, v_seed = 7/4; case means 17/3, 20/3, 11/3, 4: Var_i = 2,
  # v_test = 1/2; residuals [[5, -13, 11, -3], [2, 2, -10, 6], [-7, 11, -1, -3]] / 6: SS_res =
  # 648/36 = 18, MS_res = 3, v_res = 1/4. Var(D) = 2; Satterthwaite 4 / (49/32 + 1/12 + 1/96)
  # = 32/13 ≈ 2.46; the seed component 7/4 − 1/4 = 3/2 is over half of Var(D): ν = S − 1 = 2.
  d = [[9.0, 7.0, 8.0, 6.0], [4.0, 5.0, 0.0, 3.0], [4.0, 8.0, 3.0, 3.0]]
  v_seed, v_test, v_res = _anova_by_loops(d)
  assert (v_seed, v_test, v_res) == pytest.approx((7 / 4, 1 / 2, 1 / 4))
  assert _satterthwaite(v_seed, v_test, v_res, 3, 4) == pytest.approx(32 / 13)
  r = stats.paired_difference(np.array(d), np.zeros((3, 4)), resolve=None)
  half = scipy_stats.t.ppf(0.975, 2) * math.sqrt(2.0)
  assert r["df"] == pytest.approx(2.0)
  assert (r["low"], r["high"]) == pytest.approx((5.0 - half, 5.0 + half))


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
  # v_seed + v_test − v_res = −1 < 0: floored at the larger main part, 0 here.
  var, _ = stats.combine(parts)
  assert var == pytest.approx(0.0)
  # Var(D) = v_seed + v_test − v_res where that stays above both parts ...
  parts = {"seed": 0.5, "test": 1.0, "residual": 0.3, "df_seed": 2, "df_test": 9, "df_res": 18}
  assert stats.combine(parts)[0] == pytest.approx(1.2)
  parts["seed"] = 0.2  # ... 0.2 + 1.0 − 0.3 = 0.9 < 1.0: floored at the test part
  assert stats.combine(parts)[0] == pytest.approx(1.0)


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
    (3, 100, 0.0, 1.0, 1.73),  # no seed effect, the test part as large as the interaction
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


def _planning_by_hand(sd2_seed, sd2_case, sd2_noise, cases, *, key="net"):
  """(seeds for a half-width under 2 points, seeds for 80% power at a 2-point gap), by the
  module doc's formulas written out: the expected parts at k seeds, Satterthwaite's ν with the
  S − 1 rule keyed on the seed component (key="net") or on v_seed (key="raw")."""
  half_at, power_at = None, None
  for k in range(2, 1001):
    inter = sd2_noise / (k * cases)
    v_seed, v_test = sd2_seed / k + inter, sd2_case / cases + inter
    var = sd2_seed / k + sd2_case / cases + inter
    nu = var**2 / (
      v_seed**2 / (k - 1) + v_test**2 / (cases - 1) + inter**2 / ((k - 1) * (cases - 1))
    )
    if (sd2_seed / k if key == "net" else v_seed) >= var / 2:
      nu = min(nu, k - 1)
    crit = scipy_stats.t.ppf(0.975, nu)
    if half_at is None and crit * math.sqrt(var) < 0.02:
      half_at = k
    if power_at is None and scipy_stats.nct.sf(crit, nu, 0.02 / math.sqrt(var)) >= 0.8:
      power_at = k
    if half_at and power_at:
      return half_at, power_at
  return half_at, power_at


def test_planning_figures_with_an_interaction():
  # Measured at 3 seeds on 50 cases: σα² = 1e-4, σβ² = 1e-3, σε² = 0.02, so v_res = σε²/150,
  # v_seed = σα²/3 + v_res, v_test = σβ²/50 + v_res. The interaction dominates v_seed: keyed on
  # v_seed, the S − 1 rule would fire at the seed counts that matter and ask for one seed more
  # on each figure (10 and 20).
  sd2_seed, sd2_case, sd2_noise, cases = 1e-4, 1e-3, 0.02, 50
  inter = sd2_noise / (3 * cases)
  parts = {
    "seed": sd2_seed / 3 + inter,
    "test": sd2_case / cases + inter,
    "residual": inter,
    "df_seed": 2,
    "df_test": cases - 1,
    "df_res": 2 * (cases - 1),
  }
  comps = stats.components(parts, 3)
  assert (comps["seed"], comps["test"], comps["interaction"]) == pytest.approx(
    (sd2_seed, sd2_case, sd2_noise)
  )
  want = _planning_by_hand(sd2_seed, sd2_case, sd2_noise, cases)
  assert want == (9, 19)
  assert _planning_by_hand(sd2_seed, sd2_case, sd2_noise, cases, key="raw") == (10, 20)
  assert stats.seeds_for_half_width(parts, 3) == 9
  assert stats.seeds_to_resolve(parts, 3) == 9  # the earlier name
  assert stats.seeds_for_power(parts, 3) == 19
  # Power asks for more seeds than precision: the interval must clear zero, not just be ±2.
  # A layout whose test part alone is wider than 2 points has neither.
  wide = dict(parts, test=0.0004 + inter)
  assert stats.seeds_for_half_width(wide, 3) is None and stats.seeds_for_power(wide, 3) is None
  # paired_difference reports both for a measured layout.
  rng = np.random.default_rng(3)
  d = rng.normal(0, 0.02, (3, 1)) + rng.normal(0, 0.05, (1, 100)) + rng.normal(0, 0.1, (3, 100))
  r = stats.paired_difference(d, np.zeros_like(d))
  measured = stats.variance_parts(d)
  assert r["seeds_for_half_width"] == stats.seeds_for_half_width(measured, 3)
  assert r["seeds_for_power"] == stats.seeds_for_power(measured, 3)
  assert r["seeds_for_power"] > r["seeds_for_half_width"]
  # Rows that never differ: nothing to wait for.
  same = stats.paired_difference(d, d)
  assert (same["seeds_for_half_width"], same["seeds_for_power"]) == (2, 2)


def test_power_predicts_how_often_a_true_gap_is_called_ahead():
  # At the seed count `seeds_for_power` returns, simulated layouts with a true 2-point gap are
  # called ahead about as often as `ahead_probability` says (0.80 here; 400 layouts: a
  # standard error of 0.02).
  sd_seed, sd_case, sd_noise, cases = 0.01, 0.05, 0.15, 100
  comps = {"seed": sd_seed**2, "test": sd_case**2, "interaction": sd_noise**2, "cases": cases}
  k = stats.seeds_for_power(stats.projected_parts(comps, 3), 3)
  assert k == 14
  predicted = stats.ahead_probability(stats.projected_parts(comps, k), gap=0.02)
  assert 0.8 <= predicted < 0.82
  rng = np.random.default_rng(5)
  reps, ahead = 400, 0
  for _ in range(reps):
    d = (
      0.02
      + rng.normal(0, sd_seed, (k, 1))
      + rng.normal(0, sd_case, (1, cases))
      + rng.normal(0, sd_noise, (k, cases))
    )
    ahead += stats.paired_difference(d, np.zeros_like(d), resolve=None)["verdict"] == "ahead"
  assert abs(ahead / reps - predicted) < 0.06
