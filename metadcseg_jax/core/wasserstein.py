"""The 2-Wasserstein distance between Gaussians, differentiable (DALE's Eq. 14).

For N(μ1, Σ1) and N(μ2, Σ2) (Givens & Shortt 1984):

  W2² = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}).

The matrix square roots come from a symmetric eigendecomposition (`sqrtm_psd`) whose derivative
is written out (Daleckii-Krein): for `A = V diag(λ) Vᵀ`, `s = √λ`,

  d√A = V [(Vᵀ dA V)_ij / (s_i + s_j)] Vᵀ,

which, unlike differentiating `eigh`'s eigenvectors (factors 1 / (λ_i − λ_j)), stays finite
where eigenvalues repeat (an identity covariance, dead feature channels): only `s_i + s_j > 0`
is needed, which a jitter `ε·I` guarantees.

Example (‖μ1 − μ2‖² = 2, and tr = 2 + 8 − 2·tr(2·I) = 2):

  >>> mu1, cov1, mu2, cov2 = jnp.zeros(2), jnp.eye(2), jnp.ones(2), 4 * jnp.eye(2)
  >>> round(float(gaussian_w2_squared(mu1, cov1, mu2=mu2, cov2=cov2, jitter=0.0)), 4)
  4.0
"""

import jax
import jax.numpy as jnp

from metadcseg_jax.types import Array


def _symmetric(a: Array) -> Array:
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


@jax.custom_jvp
def _sqrtm_psd(a: Array) -> Array:
  w, v = jnp.linalg.eigh(_symmetric(a))
  s = jnp.sqrt(jnp.maximum(w, 0.0))
  return (v * s[..., None, :]) @ jnp.swapaxes(v, -1, -2)


@_sqrtm_psd.defjvp
def _sqrtm_psd_jvp(primals, tangents):
  (a,), (da,) = primals, tangents
  w, v = jnp.linalg.eigh(_symmetric(a))
  s = jnp.sqrt(jnp.maximum(w, 0.0))
  vt = jnp.swapaxes(v, -1, -2)
  out = (v * s[..., None, :]) @ vt
  denom = s[..., :, None] + s[..., None, :]
  # (√λi − √λj) / (λi − λj) = 1 / (√λi + √λj); 0 where both are 0 (no direction to move in).
  ratio = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
  dout = v @ ((vt @ _symmetric(da) @ v) * ratio) @ vt
  return out, dout


def sqrtm_psd(a: Array, *, jitter: float = 0.0) -> Array:
  """The symmetric square root of a positive semi-definite matrix plus `jitter·I`.

  Args:
    a: (..., D, D) symmetric PSD (its symmetric part is used; negative eigenvalues from
      round-off are clamped to 0).
    jitter: ε ≥ 0 added to the diagonal first, so that every eigenvalue is ≥ ε and the
      derivative (module docstring) is finite.

  Returns:
    (..., D, D) `S` with `S = Sᵀ`, `S·S = a + ε·I`.
  """
  d = a.shape[-1]
  return _sqrtm_psd(a + jitter * jnp.eye(d, dtype=a.dtype))


def gaussian_w2_squared(
  mu1: Array, cov1: Array, *, mu2: Array, cov2: Array, jitter: float = 1e-4
) -> Array:
  """Squared 2-Wasserstein distance between N(μ1, Σ1 + εI) and N(μ2, Σ2 + εI) (DALE's Eq. 14).

  `‖μ1 − μ2‖² + tr(Σ1' + Σ2' − 2 (Σ1'^{1/2} Σ2' Σ1'^{1/2})^{1/2})` with `Σk' = Σk + ε·I`: the
  jitter regularises both Gaussians alike, so identical inputs give 0 (up to round-off).

  Args:
    mu1, mu2: (..., D) means.
    cov1, cov2: (..., D, D) PSD covariances.
    jitter: ε ≥ 0.

  Returns:
    (...) the squared distance, ≥ 0 up to round-off.

  References:
    Givens & Shortt, "A class of Wasserstein metrics for probability distributions", Michigan
    Math. J. 1984. Fang et al., "Minding Fuzzy Regions" (DALE), CVPR 2025, Eq. 14.
  """
  eye = jnp.eye(cov1.shape[-1], dtype=cov1.dtype)
  c1 = _symmetric(cov1) + jitter * eye
  c2 = _symmetric(cov2) + jitter * eye
  r1 = sqrtm_psd(c1)
  cross = jnp.trace(sqrtm_psd(r1 @ c2 @ r1), axis1=-2, axis2=-1)
  mean_term = jnp.sum((mu1 - mu2) ** 2, axis=-1)
  return mean_term + jnp.trace(c1 + c2, axis1=-2, axis2=-1) - 2.0 * cross


def weighted_gaussian(x: Array, w: Array) -> tuple[Array, Array, Array]:
  """Mean and covariance of points with non-negative weights (the maximum-likelihood fit).

  Args:
    x: (N, D) points.
    w: (N,) weights ≥ 0.

  Returns:
    `(μ (D,), Σ (D,D), Σw ())`: `μ = Σ w x / Σ w`, `Σ = Σ w (x − μ)(x − μ)ᵀ / Σ w`; zeros where
    `Σ w = 0`.
  """
  total = jnp.sum(w)
  safe = jnp.where(total > 0, total, 1.0)
  mu = jnp.sum(w[:, None] * x, axis=0) / safe
  xc = x - mu
  cov = (w[:, None] * xc).T @ xc / safe
  return mu, cov, total
