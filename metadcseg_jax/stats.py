r"""Paired comparisons of two methods over seeds and test cases, with a 95% interval.

Two benchmark rows trained with the same seeds and scored on the same test cases give a
matrix of paired differences d[s, i] = a[s, i] − b[s, i] (seed s, test case i). Its mean D is
the reported difference. Both the seeds and the test cases are samples: a user's next run has
another seed (initialisation, data order and, with the benchmark's per-seed labels, another
noise realisation and meta set) and their data another test set. The interval treats d as a
two-way random-effects layout,

    d[s, i] = μ + α_s + β_i + ε_si,   Var(D) = σα²/S + σβ²/N + σε²/(S·N),

estimated without bias from the two-way analysis of variance of d:

    seed part      v_seed = Var_s(mean_i d[s, i]) / S    (σα²/S + σε²/(S·N))
    test part      v_test = Var_i(mean_s d[s, i]) / N    (σβ²/N + σε²/(S·N))
    interaction    v_res  = MS_res / (S·N)               (σε²/(S·N))
    Var(D) ≈ v_seed + v_test − v_res,

with sample variances (ddof 1) and MS_res the residual mean square of the two-way layout. The
95% interval is D ± t_{0.975, ν}·√Var(D), ν by Welch–Satterthwaite over the three parts, or
S − 1 when the seed part is at least half of Var(D) (with 3 seeds t = 4.3 then, and the
interval is wide, as it should be). The two parts are reported as standard errors, √v_seed
and √v_test.

The verdict: "ahead" when the interval lies above zero, "behind" when below, "not resolved"
otherwise; with one seed the seed part is unknown and the verdict is "one seed".
"""

import math
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95


def _t_quantile(df: float, level: float) -> float:
  return (
    float(scipy_stats.t.ppf(0.5 + level / 2.0, df))
    if math.isfinite(df)
    else float(scipy_stats.norm.ppf(0.5 + level / 2.0))
  )


def variance_parts(d: np.ndarray) -> dict[str, float]:
  """The variance parts of the mean of a (S, N) matrix of paired differences (module doc).

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


def _combine(parts: dict[str, float]) -> tuple[float, float]:
  """(Var(D), Satterthwaite ν) from `variance_parts`."""
  terms = [(parts["seed"], parts["df_seed"]), (parts["test"], parts["df_test"])]
  if math.isfinite(parts["residual"]):
    terms.append((-parts["residual"], parts["df_res"]))
  # Each main part alone already bounds Var(D) from below (in expectation v_seed + v_test − v_res
  # is at least either): a sample where the subtraction goes under it is floored there.
  var = max(sum(v for v, _ in terms), parts["seed"], parts["test"])
  denom = sum(v * v / df for v, df in terms if df > 0)
  df = var * var / denom if denom > 0 else math.inf
  if parts["seed"] >= 0.5 * var:
    # Satterthwaite's ν is liberal when a part with few degrees of freedom dominates (simulated
    # coverage 0.91 at 3 seeds, 100 cases, the seed part 80% of the variance): the seed part's
    # own S − 1 then (coverage 0.94-0.97 over the layouts of tests/test_stats.py).
    df = min(df, parts["df_seed"])
  return var, df


def paired_difference(
  a: Any, b: Any, *, level: float = LEVEL, resolve: float | None = 0.02
) -> dict:
  """Mean paired difference a − b with its interval, parts and verdict.

  Args:
    a, b: (S, N) scores of two rows on the same S seeds and N test cases (e.g. Dice in [0, 1]).
    level: the interval's coverage.
    resolve: a difference size (0.02: 2 Dice points) for which `seeds_to_resolve` is given.

  Returns:
    {"mean", "low", "high", "se_seed", "se_test", "df", "verdict", "seeds", "cases",
    "seeds_to_resolve"}: the interval [low, high]; se_seed and se_test the standard errors of
    the two parts (√v_seed, √v_test); seeds_to_resolve the least seed count whose expected
    interval half-width at this variance is below `resolve` (None when more than 1000, with
    one seed, or when `resolve` is None).
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
  }
  if s < 2 or n < 2:
    return {
      **out,
      "low": None,
      "high": None,
      "df": None,
      "verdict": "one seed" if s < 2 else "one case",
      "seeds_to_resolve": None,
    }
  var, df = _combine(parts)
  half = _t_quantile(df, level) * math.sqrt(var)
  low, high = mean - half, mean + half
  verdict = "ahead" if low > 0 else ("behind" if high < 0 else "not resolved")
  return {
    **out,
    "low": low,
    "high": high,
    "df": df,
    "verdict": verdict,
    "seeds_to_resolve": (
      None if resolve is None else seeds_to_resolve(parts, s, level=level, resolve=resolve)
    ),
  }


def seeds_to_resolve(
  parts: dict[str, float], seeds: int, *, level: float = LEVEL, resolve: float = 0.02
) -> int | None:
  """The least seed count S' whose interval half-width is below `resolve`, the per-seed
  variance σα² + σε²/N and the test-set parts held at their measured values (the test set, and
  so v_test, does not shrink with more seeds). None beyond 1000 seeds."""
  per_seed_var = parts["seed"] * seeds  # σα² + σε²/N
  residual_per_seed = parts["residual"] * seeds  # σε²/N
  for k in range(2, 1001):
    scaled = {
      "seed": per_seed_var / k,
      "test": parts["test"] - parts["residual"] + residual_per_seed / k,
      "residual": residual_per_seed / k,
      "df_seed": k - 1,
      "df_test": parts["df_test"],
      "df_res": (k - 1) * parts["df_test"],
    }
    var, df = _combine(scaled)
    if _t_quantile(df, level) * math.sqrt(var) < resolve:
      return k
  return None
