r"""Paired comparisons of two methods over seeds and test cases, with a 95% interval.

Two benchmark rows trained with the same seeds and scored on the same test cases give a
matrix of paired differences d[s, i] = a[s, i] − b[s, i] (seed s, test case i). Its mean D is
the reported difference. Both the seeds and the test cases are samples: a user's next run has
another seed (initialisation, data order and, with the benchmark's per-seed labels, another
noise realisation and meta set) and their data another test set. The interval treats d as a
two-way random-effects layout,

    d[s, i] = μ + α_s + β_i + ε_si,   Var(D) = σα²/S + σβ²/N + σε²/(S·N),

estimated without bias from the two-way analysis of variance of d:

    seed part      v_seed = Var_s(mean_i d[s, i]) / S    (σα²/S + σε²/(S·N)),  S − 1 df
    test part      v_test = Var_i(mean_s d[s, i]) / N    (σβ²/N + σε²/(S·N)),  N − 1 df
    interaction    v_res  = MS_res / (S·N)               (σε²/(S·N)),  (S − 1)(N − 1) df
    Var(D) ≈ v_seed + v_test − v_res,

with sample variances (ddof 1) and MS_res the residual mean square of the two-way layout (the
estimate is floored at max(v_seed, v_test), each of which it is at least in expectation). The
95% interval is D ± t_{0.975, ν}·√Var(D), ν by Welch–Satterthwaite over the three parts,

    ν = Var(D)² / (v_seed²/(S − 1) + v_test²/(N − 1) + v_res²/((S − 1)(N − 1))),

or S − 1 when the seed component is at least half of Var(D) (the S − 1 rule, below). The
seed and test parts are reported as standard errors, √v_seed and √v_test.

The S − 1 rule. Satterthwaite's ν treats the estimate of Var(D) as a scaled χ²; that is
liberal when a part known from few degrees of freedom carries most of the variance (simulated
coverage 0.91 at 3 seeds, 100 cases, the seeds 80% of the variance and no rule). The part known
only from the S seeds is the seed component σα²/S. v_seed is not it: v_seed also holds the
interaction σε²/(S·N), which shrinks with the test cases as well as the seeds, and which v_res
estimates from (S − 1)(N − 1) degrees of freedom. Net of it,

    seed component = max(v_seed − v_res, 0)     (expectation σα²/S),

and ν is capped at S − 1 when that is at least half of Var(D); the interaction's share of
v_seed stays weighed by Satterthwaite's ν, where the v_seed term keeps its S − 1 degrees of
freedom. Keyed on v_seed itself (firing when v_seed + v_res ≥ v_test), the rule fired wherever
the interaction was large, seeds or not: at 3 seeds and 100 cases with no seed effect and the
test part equal to the interaction (σα = 0, σβ = 1, σε = 1.73), 2000 simulated layouts covered
0.971 either way, with a mean half-width of 0.449 keyed on v_seed and 0.373 on the seed
component (Satterthwaite alone: 0.358). Where the seeds dominate the two keys agree (σα = 3,
σβ = 0.5, σε = 1: coverage 0.95 both).

Planning figures, from the components estimated on the layout (moment estimates, floored at 0)

    σα² = S·(v_seed − v_res),   σβ² = N·(v_test − v_res),   σε² = S·N·v_res,

projected to S' seeds on the same N test cases (`projected_parts`: the parts' expectations,
with S' − 1 and (S' − 1)(N − 1) degrees of freedom):

* half-width: the least S' whose interval half-width t_{0.975, ν'}·√Var'(D) is below a size
  (2 points). A precision estimate: it says how narrow the interval would be, not whether a
  difference of that size would be resolved; from 3 seeds it is itself noisy (v_seed has 2
  degrees of freedom).
* power: the least S' at which a true difference δ (2 points) would be called "ahead" with
  probability 0.8. "Ahead" is D̂/√V̂ > t_{0.975, ν'}; with D̂ ~ N(δ, V'), V' = Var'(D), and
  ν'·V̂/V' ~ χ²_ν' (Satterthwaite's approximation), D̂/√V̂ is noncentral t with ν' degrees of
  freedom and noncentrality δ/√V', so

      P(ahead) = 1 − F_{t(ν', δ/√V')}(t_{0.975, ν'}),

  ν' the degrees of freedom the interval would have at S' seeds (Satterthwaite and the S − 1
  rule on the projected parts).

Both improve with seeds toward the test set's own part σβ²/N, which more seeds cannot shrink;
neither is given past 1000 seeds.

The verdict: "ahead" when the interval lies above zero, "behind" when below, "not resolved"
otherwise; with one seed the seed part is unknown and the verdict is "one seed".
"""

import math
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
# The planning figures' defaults: a 2-point difference (Dice in [0, 1]), called ahead 80% of
# the time.
PLANNING_GAP = 0.02
PLANNING_POWER = 0.8
MAX_SEEDS = 1000


def _t_quantile(df: float, level: float) -> float:
  return (
    float(scipy_stats.t.ppf(0.5 + level / 2.0, df))
    if math.isfinite(df)
    else float(scipy_stats.norm.ppf(0.5 + level / 2.0))
  )


def variance_parts(d: np.ndarray) -> dict[str, float]:
  """The variance parts of the mean of a (S, N) matrix of paired differences (module doc).

  Args:
    d: (S, N) paired differences, seeds by test cases.

  Returns:
    {"seed", "test", "residual"}: v_seed, v_test, v_res (v_seed is NaN for S = 1, v_test for
    N = 1, v_res when either is 1), and "df_seed" S − 1, "df_test" N − 1, "df_res".
  """
  d = np.asarray(d, np.float64)
  if d.ndim != 2 or d.size == 0:
    raise ValueError(f"paired differences must be a non-empty (seeds, cases) matrix, got {d.shape}")
  s, n = d.shape
  per_seed, per_case, grand = d.mean(axis=1), d.mean(axis=0), d.mean()
  v_seed = float(np.var(per_seed, ddof=1) / s) if s > 1 else math.nan
  v_test = float(np.var(per_case, ddof=1) / n) if n > 1 else math.nan
  if s > 1 and n > 1:
    resid = d - per_seed[:, None] - per_case[None, :] + grand
    v_res = float(np.sum(resid**2) / ((s - 1) * (n - 1)) / (s * n))
  else:
    v_res = math.nan
  return {
    "seed": v_seed,
    "test": v_test,
    "residual": v_res,
    "df_seed": s - 1,
    "df_test": n - 1,
    "df_res": (s - 1) * (n - 1),
  }


def combine(parts: dict[str, float]) -> tuple[float, float]:
  """(Var(D), ν) of the interval from `variance_parts` of a layout with S, N >= 2 (module doc:
  Satterthwaite's ν, capped at S − 1 by the S − 1 rule)."""
  v_seed, v_test, v_res = parts["seed"], parts["test"], parts["residual"]
  var = v_seed + v_test - v_res
  # A sample where the subtraction goes under one main part is floored there (in expectation
  # v_test − v_res and v_seed − v_res are variances, so Var(D) is at least either part).
  var = max(var, v_seed, v_test)
  denom = v_seed**2 / parts["df_seed"] + v_test**2 / parts["df_test"] + v_res**2 / parts["df_res"]
  df = var * var / denom if denom > 0 else math.inf
  if max(v_seed - v_res, 0.0) >= 0.5 * var:
    # Satterthwaite's ν is liberal when the seed component dominates (module doc): its own
    # S − 1 then (simulated coverage 0.94-0.985 over the layouts of tests/test_stats.py,
    # 3000 each).
    df = min(df, parts["df_seed"])
  return var, df


def components(parts: dict[str, float], seeds: int) -> dict[str, float]:
  """The variance components of the two-way layout, moment estimates floored at 0.

  Args:
    parts: `variance_parts` of a (seeds, N) layout, seeds and N at least 2.
    seeds: S, the layout's seed count.

  Returns:
    {"seed": σα² = S·(v_seed − v_res), "test": σβ² = N·(v_test − v_res), "interaction":
    σε² = S·N·v_res, "cases": N}.
  """
  cases = parts["df_test"] + 1
  return {
    "seed": max(seeds * (parts["seed"] - parts["residual"]), 0.0),
    "test": max(cases * (parts["test"] - parts["residual"]), 0.0),
    "interaction": max(seeds * cases * parts["residual"], 0.0),
    "cases": cases,
  }


def projected_parts(comps: dict[str, float], seeds: int) -> dict[str, float]:
  """The expected `variance_parts` of a layout of `seeds` seeds on the same test cases.

  Args:
    comps: `components` (σα², σβ², σε², N).
    seeds: S', at least 2.

  Returns:
    {"seed": σα²/S' + σε²/(S'N), "test": σβ²/N + σε²/(S'N), "residual": σε²/(S'N), and the
    degrees of freedom S' − 1, N − 1, (S' − 1)(N − 1)}.
  """
  n = comps["cases"]
  res = comps["interaction"] / (seeds * n)
  return {
    "seed": comps["seed"] / seeds + res,
    "test": comps["test"] / n + res,
    "residual": res,
    "df_seed": seeds - 1,
    "df_test": n - 1,
    "df_res": (seeds - 1) * (n - 1),
  }


def half_width(parts: dict[str, float], *, level: float = LEVEL) -> float:
  """The interval's half-width t_{q, ν}·√Var(D) for `variance_parts` (S, N >= 2)."""
  var, df = combine(parts)
  return _t_quantile(df, level) * math.sqrt(var)


def ahead_probability(parts: dict[str, float], *, gap: float, level: float = LEVEL) -> float:
  """The probability that a true difference `gap` > 0 is called "ahead" (module doc):
  1 − F(t_{q, ν}) of the noncentral t with ν degrees of freedom and noncentrality gap/√Var(D),
  ν and Var(D) from `combine(parts)`."""
  var, df = combine(parts)
  if var <= 0:  # no variance left: any positive gap is called ahead
    return 1.0 if gap > 0 else 0.0
  crit = _t_quantile(df, level)
  shift = gap / math.sqrt(var)
  if not math.isfinite(df):
    return float(scipy_stats.norm.sf(crit - shift))
  return float(scipy_stats.nct.sf(crit, df, shift))


def _least_seeds(ok) -> int | None:
  """The least S' in [2, MAX_SEEDS] with ok(S'); None when even MAX_SEEDS fails (both figures
  improve with seeds, so that is checked first and saves the scan)."""
  if not ok(MAX_SEEDS):
    return None
  return next(k for k in range(2, MAX_SEEDS + 1) if ok(k))


def seeds_for_half_width(
  parts: dict[str, float], seeds: int, *, level: float = LEVEL, size: float = PLANNING_GAP
) -> int | None:
  """The least seed count S' whose interval half-width would be below `size` (a precision
  estimate, module doc: "Planning figures").

  Args:
    parts: `variance_parts` of the measured (seeds, N) layout, seeds and N at least 2.
    seeds: S, the measured layout's seed count.
    level: the interval's coverage.
    size: the half-width wanted, in units of the scores (0.02: 2 Dice points).

  Returns:
    S', or None beyond `MAX_SEEDS` (the test set's own part alone exceeds `size`, say).
  """
  comps = components(parts, seeds)
  return _least_seeds(lambda k: half_width(projected_parts(comps, k), level=level) < size)


def seeds_to_resolve(
  parts: dict[str, float], seeds: int, *, level: float = LEVEL, resolve: float = PLANNING_GAP
) -> int | None:
  """`seeds_for_half_width` under its earlier name: the seeds at which the interval's
  half-width would be below `resolve` (precision, not the seeds that resolve such a gap: that
  is `seeds_for_power`).

  Args:
    parts, seeds, level, resolve: as in `seeds_for_half_width`.
  """
  return seeds_for_half_width(parts, seeds, level=level, size=resolve)


def seeds_for_power(
  parts: dict[str, float],
  seeds: int,
  *,
  level: float = LEVEL,
  gap: float = PLANNING_GAP,
  power: float = PLANNING_POWER,
) -> int | None:
  """The least seed count S' at which a true difference `gap` would be called "ahead" with
  probability at least `power` (module doc: "Planning figures").

  Args:
    parts: `variance_parts` of the measured (seeds, N) layout, seeds and N at least 2.
    seeds: S, the measured layout's seed count.
    level: the interval's coverage.
    gap: the true difference, in units of the scores (0.02: 2 Dice points), > 0.
    power: the probability wanted.

  Returns:
    S', or None beyond `MAX_SEEDS`.
  """
  comps = components(parts, seeds)
  return _least_seeds(
    lambda k: ahead_probability(projected_parts(comps, k), gap=gap, level=level) >= power
  )


def paired_difference(
  a: Any,
  b: Any,
  *,
  level: float = LEVEL,
  resolve: float | None = PLANNING_GAP,
  power: float = PLANNING_POWER,
) -> dict:
  """Mean paired difference a − b with its interval, parts, verdict and planning figures.

  Args:
    a, b: (S, N) scores of two rows on the same S seeds and N test cases (e.g. Dice in [0, 1]).
    level: the interval's coverage.
    resolve: the difference size of the planning figures (0.02: 2 Dice points); None skips
      them.
    power: the probability of "ahead" that `seeds_for_power` asks for.

  Returns:
    {"mean", "low", "high", "se_seed", "se_test", "df", "verdict", "seeds", "cases",
    "seeds_for_half_width", "seeds_for_power"}: the interval [low, high]; se_seed and se_test
    the standard errors of the two parts (√v_seed, √v_test); seeds_for_half_width the seeds at
    which the interval's half-width would be below `resolve`, seeds_for_power those at which a
    true difference `resolve` would be called ahead with probability `power` (module doc; None
    beyond 1000 seeds, with one seed or case, or when `resolve` is None).

  Row a scores 3 Dice points above row b on average, with noise, on 3 seeds × 20 test cases:

  >>> rng = np.random.default_rng(0)
  >>> b = rng.uniform(0.6, 0.9, size=(3, 20))
  >>> a = b + 0.03 + rng.normal(0.0, 0.02, size=(3, 20))
  >>> d = paired_difference(a, b, resolve=None)
  >>> round(d["mean"], 3), round(d["low"], 3), round(d["high"], 3), d["verdict"]
  (0.032, 0.025, 0.039, 'ahead')
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
  d = a - b
  s, n = d.shape
  parts = variance_parts(d)
  mean = float(d.mean())
  out = {
    "mean": mean,
    "seeds": s,
    "cases": n,
    "se_seed": math.sqrt(parts["seed"]) if s > 1 else None,
    "se_test": math.sqrt(parts["test"]) if n > 1 else None,
    "seeds_for_half_width": None,
    "seeds_for_power": None,
  }
  if s < 2 or n < 2:
    return {
      **out,
      "low": None,
      "high": None,
      "df": None,
      "verdict": "one seed" if s < 2 else "one case",
    }
  var, df = combine(parts)
  half = _t_quantile(df, level) * math.sqrt(var)
  low, high = mean - half, mean + half
  verdict = "ahead" if low > 0 else ("behind" if high < 0 else "not resolved")
  if resolve is not None:
    out["seeds_for_half_width"] = seeds_for_half_width(parts, s, level=level, size=resolve)
    out["seeds_for_power"] = seeds_for_power(parts, s, level=level, gap=resolve, power=power)
  return {**out, "low": low, "high": high, "df": df, "verdict": verdict}
