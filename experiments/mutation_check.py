r"""Mutation check: does the test suite kill wrong formulas in the method code and statistics?

Applies one-line wrong formulas (a swapped pair, a dropped factor, a sign, an axis, a detached
or undetached term, a wrong normaliser) to `meta.py`, `dcd.py`, `objective.py`, `optim.py`,
`wasserstein.py` and the methods, and wrong variance formulas (the interaction counted twice,
a normal quantile, a Satterthwaite denominator or an S − 1 rule that misreads the interaction,
a normal power approximation) to `stats.py`, one at a time, each in a temporary copy of the
repository (the working tree is never touched), and runs the tests that should notice. A
mutant is killed when a test fails; mutants known to be equivalent (no observable change in
what the step computes) carry the reason, and are still run to confirm that they survive.

    python experiments/mutation_check.py               # every mutant, ~15-30 min on 2 cores
    python experiments/mutation_check.py --only=meta_b_tilde_from_ga,dcd_center_drops_gamma
    python experiments/mutation_check.py --files=metadcseg_jax/benchmark/stats.py   # ~30 s
    python experiments/mutation_check.py --list

Prints a Markdown table (mutant, file, change, result, the first failing test) and exits 1 if
a mutant not marked equivalent survives, or an equivalent one is killed.
"""

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

REFERENCE = "tests/test_reference_steps.py::test_step_equals_reference"
META_TESTS = (REFERENCE, "tests/test_meta.py")
LOSS_TESTS = (
  REFERENCE,
  "tests/test_objective.py",
  "tests/test_dcd.py",
  "tests/test_fd_more.py::test_metadcseg_objective_gradient_in_the_parameters",
)
OPTIM_TESTS = (REFERENCE, "tests/test_optim.py", "tests/test_fd_more.py")
METHOD_TESTS = (REFERENCE, "tests/test_methods.py")
# The whole-step references alone (tests/test_gsdnet.py and test_dale.py check the pieces, but
# take minutes more to run).
GSD_TESTS = ("tests/test_reference_steps.py::test_gsdnet_step_equals_reference",)
DALE_TESTS = ("tests/test_reference_steps.py::test_dale_step_equals_reference",)
STATS_TESTS = ("tests/test_stats.py",)


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]
  equivalent: str = ""  # why no test can tell it from the original, if so


MUTANTS = [
  # ---------------------------------------------------------------- meta.py
  Mutant(
    "meta_b_tilde_from_ga",
    "metadcseg_jax/core/meta.py",
    "b_t = jnp.maximum(b0 - eta * gb, 0.0)",
    "b_t = jnp.maximum(b0 - eta * ga, 0.0)",
    META_TESTS,
  ),
  Mutant(
    "meta_a_hat_b_hat_swapped",
    "metadcseg_jax/core/meta.py",
    "return a_t, b_t, a_hat, b_hat, gamma, pi_a, pi_b",
    "return a_t, b_t, b_hat, a_hat, gamma, pi_a, pi_b",
    META_TESTS,
  ),
  Mutant(
    "meta_rectify_sign",
    "metadcseg_jax/core/meta.py",
    "a_t = jnp.maximum(a0 - eta * ga, 0.0)",
    "a_t = jnp.maximum(a0 + eta * ga, 0.0)",
    META_TESTS,
  ),
  Mutant(
    "meta_normalizer_swapped",
    "metadcseg_jax/core/meta.py",
    'axes = (1, 2) if normalizer == "image" else None',
    'axes = (1, 2) if normalizer == "batch" else None',
    META_TESTS,
  ),
  Mutant(
    "meta_normalizer_axis",
    "metadcseg_jax/core/meta.py",
    'axes = (1, 2) if normalizer == "image" else None',
    'axes = (2,) if normalizer == "image" else None',
    META_TESTS,
  ),
  Mutant(
    "meta_gamma_drops_b",
    "metadcseg_jax/core/meta.py",
    "  gamma = a_t + b_t\n  axes",
    "  gamma = a_t\n  axes",
    META_TESTS,
  ),
  Mutant(
    "meta_pi_a_from_b",
    "metadcseg_jax/core/meta.py",
    "pi_a = jnp.where(positive, a_t / safe_gamma, 0.0)",
    "pi_a = jnp.where(positive, b_t / safe_gamma, 0.0)",
    META_TESTS,
  ),
  Mutant(
    "meta_reverse_virtual_loss_unscaled",
    "metadcseg_jax/core/meta.py",
    "return jnp.sum(a * ce_map(logits, y) + b * ce_map(logits, y_pseudo)) / y.size",
    "return jnp.sum(a * ce_map(logits, y) + b * ce_map(logits, y_pseudo))",
    META_TESTS,
  ),
  Mutant(
    "meta_jvp_pixel_count_times_classes",
    "metadcseg_jax/core/meta.py",
    "n = df.size // df.shape[-1]",
    "n = df.size",
    META_TESTS,
  ),
  Mutant(
    "meta_jvp_ga_from_dg",
    "metadcseg_jax/core/meta.py",
    "ga = jnp.sum(df * dlogits, axis=-1) / n",
    "ga = jnp.sum(dg * dlogits, axis=-1) / n",
    META_TESTS,
  ),
  Mutant(
    "meta_virtual_step_clipped",
    "metadcseg_jax/core/meta.py",
    "updates, _ = optimizer.base.update(grads, base_state, params)",
    "updates, _ = optimizer.tx.update(grads, opt_state, params)",
    META_TESTS,
  ),
  Mutant(
    "meta_reverse_update_detached",
    "metadcseg_jax/core/meta.py",
    "theta_hat = optax.apply_updates(params, update(grads))\n    return _meta_loss",
    "theta_hat = optax.apply_updates(params, jax.lax.stop_gradient(update(grads)))\n"
    "    return _meta_loss",
    META_TESTS,
  ),
  Mutant(
    "meta_virtual_step_fresh_state",
    "metadcseg_jax/core/meta.py",
    "  base_state = optimizer.base_state(opt_state)\n",
    "  base_state = optimizer.base.init(params)\n",
    META_TESTS,
  ),
  Mutant(
    "meta_outputs_undetached",
    "metadcseg_jax/core/meta.py",
    "      fwd._replace(outputs=jax.lax.stop_gradient(fwd.outputs)),\n",
    "      fwd,\n",
    META_TESTS,
    equivalent="every MetaOutput field is stop-gradiented on return from _meta_from_forward, "
    "so the real loss sees the same constants either way",
  ),
  # ---------------------------------------------------------------- objective.py
  Mutant(
    "objective_f_g_swapped",
    "metadcseg_jax/core/objective.py",
    "per_pixel = a_hat * f + b_hat * g  # L^hw of Eq. 1",
    "per_pixel = a_hat * g + b_hat * f  # L^hw of Eq. 1",
    LOSS_TESTS,
  ),
  Mutant(
    "objective_reduce_swapped",
    "metadcseg_jax/core/objective.py",
    'reduce = jnp.mean if normalizer == "image" else jnp.sum',
    'reduce = jnp.sum if normalizer == "image" else jnp.mean',
    LOSS_TESTS,
  ),
  Mutant(
    "objective_bd_sign",
    "metadcseg_jax/core/objective.py",
    "loss = ce_term + lambda_bd * bd_term + lambda_dice * dice_term",
    "loss = ce_term - lambda_bd * bd_term + lambda_dice * dice_term",
    LOSS_TESTS,
  ),
  Mutant(
    "objective_boundary_unweighted",
    "metadcseg_jax/core/objective.py",
    'boundary_loss = per_pixel if pixel_loss == "meta" else pi_a * f + pi_b * g',
    'boundary_loss = f if pixel_loss == "meta" else pi_a * f + pi_b * g',
    LOSS_TESTS,
  ),
  Mutant(
    "objective_meta_off_normalizer",
    "metadcseg_jax/core/objective.py",
    'n = h * w if normalizer == "image" else b * h * w',
    'n = b * h * w if normalizer == "image" else h * w',
    LOSS_TESTS,
  ),
  Mutant(
    "objective_l2b_reduce_swapped",
    "metadcseg_jax/core/objective.py",
    'return jnp.mean(per_image) if normalizer == "image" else jnp.sum(per_image)',
    'return jnp.sum(per_image) if normalizer == "image" else jnp.mean(per_image)',
    LOSS_TESTS,
  ),
  Mutant(
    "objective_dice_on_pseudo_labels",
    "metadcseg_jax/core/objective.py",
    "dice_term = jnp.mean(soft_dice_loss(logits, noisy_label)) if use_dice",
    "dice_term = jnp.mean(soft_dice_loss(logits, y_pseudo)) if use_dice",
    LOSS_TESTS,
  ),
  # ---------------------------------------------------------------- dcd.py
  Mutant(
    "dcd_boundary_and_edges",
    "metadcseg_jax/core/dcd.py",
    "bd = ((m >= 1.0 - tau) & (m <= tau)) | edges",
    "bd = ((m >= 1.0 - tau) & (m <= tau)) & edges",
    LOSS_TESTS,
  ),
  Mutant(
    "dcd_center_drops_gamma",
    "metadcseg_jax/core/dcd.py",
    'num = jnp.einsum("khw,hwd->kd", mg, h)  # (3, D)',
    'num = jnp.einsum("khw,hwd->kd", m, h)  # (3, D)',
    LOSS_TESTS,
  ),
  Mutant(
    "dcd_centers_detached",
    "metadcseg_jax/core/dcd.py",
    "valid[:, None], num / safe_gsum[:, None], jax.lax.stop_gradient(default_centers)",
    "valid[:, None], jax.lax.stop_gradient(num) / safe_gsum[:, None], "
    "jax.lax.stop_gradient(default_centers)",
    LOSS_TESTS,
  ),
  Mutant(
    "dcd_distance_pair_swapped",
    "metadcseg_jax/core/dcd.py",
    "num = d[..., FG] * d[..., BG]",
    "num = d[..., FG] * d[..., BD]",
    LOSS_TESTS,
  ),
  Mutant(
    "dcd_weights_not_mean_one",
    "metadcseg_jax/core/dcd.py",
    'return w * count if weight_sum == "mean_one" else w',
    "return w",
    LOSS_TESTS,
  ),
  Mutant(
    "dcd_weights_detach_inverted",
    "metadcseg_jax/core/dcd.py",
    "  if options.detach_weights:\n    w = jax.lax.stop_gradient(w)",
    "  if not options.detach_weights:\n    w = jax.lax.stop_gradient(w)",
    LOSS_TESTS,
  ),
  Mutant(
    "dcd_gamma_undetached",
    "metadcseg_jax/core/dcd.py",
    "gamma = jax.lax.stop_gradient(gamma).astype(h.dtype)",
    "gamma = gamma.astype(h.dtype)",
    LOSS_TESTS,  # inside a training step γ is a constant anyway; test_dcd checks the function
  ),
  Mutant(
    "dcd_center_ema_swapped",
    "metadcseg_jax/core/dcd.py",
    "ema = momentum * default_centers + (1.0 - momentum) * mean",
    "ema = momentum * mean + (1.0 - momentum) * default_centers",
    LOSS_TESTS,
  ),
  # ---------------------------------------------------------------- optim.py
  Mutant(
    "optim_weight_decay_sign",
    "metadcseg_jax/core/optim.py",
    "      optax.add_decayed_weights(weight_decay),\n      optax.sgd(",
    "      optax.add_decayed_weights(-weight_decay),\n      optax.sgd(",
    OPTIM_TESTS,
  ),
  Mutant(
    "optim_schedule_per_step",
    "metadcseg_jax/core/optim.py",
    "epoch = jnp.asarray(step) // steps_per_epoch",
    "epoch = jnp.asarray(step) % steps_per_epoch",
    OPTIM_TESTS,
  ),
  Mutant(
    "optim_clip_after_update",
    "metadcseg_jax/core/optim.py",
    "tx, base_state = optax.chain(optax.clip_by_global_norm(grad_clip), base), _chain_base_state",
    "tx, base_state = optax.chain(base, optax.clip_by_global_norm(grad_clip)), _chain_base_state",
    OPTIM_TESTS,
  ),
  # ---------------------------------------------------------------- methods
  Mutant(
    "l2b_updates_per_step",
    "metadcseg_jax/methods/l2b.py",
    "return 2 if self.config.meta.extra_clean_step else 1",
    "return 1",
    METHOD_TESTS,
  ),
  Mutant(
    "l2b_clean_step_on_noisy_stats",
    "metadcseg_jax/methods/l2b.py",
    "params, opt_state, stats = self._clean_step(params, opt_state, stats, batch)",
    "params, opt_state, _ = self._clean_step(params, opt_state, stats, batch)",
    METHOD_TESTS,
  ),
  Mutant(
    "base_ema_rate_swapped",
    "metadcseg_jax/methods/base.py",
    "rate = 1.0 - self.config.train.ema_decay",
    "rate = self.config.train.ema_decay",
    METHOD_TESTS,
  ),
  Mutant(
    "metadcseg_centers_not_kept",
    "metadcseg_jax/methods/metadcseg.py",
    'return {**state.extra, "dcd_centers": aux["new_default_centers"]}',
    "return state.extra",
    METHOD_TESTS,
  ),
  Mutant(
    "gsdnet_kl_weight_dropped",
    "metadcseg_jax/methods/gsdnet.py",
    "return ce + co_lambda * two_network.symmetric_kl_map(logits1, logits2)",
    "return ce + two_network.symmetric_kl_map(logits1, logits2)",
    GSD_TESTS,
  ),
  Mutant(
    "gsdnet_refined_labels_swapped",
    "metadcseg_jax/methods/gsdnet.py",
    "refined = jnp.where(pick > 0, y, pseudo)",
    "refined = jnp.where(pick > 0, pseudo, y)",
    GSD_TESTS,
  ),
  Mutant(
    "gsdnet_dice_unscaled",
    "metadcseg_jax/methods/gsdnet.py",
    'out[f"dice_{i}"] = 0.5 * w_mean * jnp.mean(class_dice_loss(probs, labels))',
    'out[f"dice_{i}"] = 0.5 * jnp.mean(class_dice_loss(probs, labels))',
    GSD_TESTS,
  ),
  Mutant(
    "two_network_gradients_swapped",
    "metadcseg_jax/methods/two_network.py",
    "p2, o2 = self.update_params(state.params[1], state.opt_state[1], grads[1])",
    "p2, o2 = self.update_params(state.params[1], state.opt_state[1], grads[0])",
    GSD_TESTS,
  ),
  Mutant(
    "dale_keep_sign",
    "metadcseg_jax/methods/dale.py",
    "keep = (omega > 1.0) if d.use_omega else jnp.ones(y.shape, bool)",
    "keep = (omega < 1.0) if d.use_omega else jnp.ones(y.shape, bool)",
    DALE_TESTS,
  ),
  Mutant(
    "dale_alignment_unweighted_by_omega",
    "metadcseg_jax/methods/dale.py",
    "loss = seg + float(d.alpha) * jnp.mean(omega) * w2",
    "loss = seg + float(d.alpha) * w2",
    DALE_TESTS,
  ),
  Mutant(
    "dale_masks_swapped",
    "metadcseg_jax/methods/dale.py",
    "return m, mf, mn, x * mf[..., None], x * mn[..., None]",
    "return m, mf, mn, x * mn[..., None], x * mf[..., None]",
    DALE_TESTS,
  ),
  Mutant(
    "wasserstein_cross_term_sign",
    "metadcseg_jax/core/wasserstein.py",
    "return mean_term + jnp.trace(c1 + c2, axis1=-2, axis2=-1) - 2.0 * cross",
    "return mean_term + jnp.trace(c1 + c2, axis1=-2, axis2=-1) + 2.0 * cross",
    DALE_TESTS,
  ),
  Mutant(
    "metadcseg_meta_off_pseudo_is_label",
    "metadcseg_jax/methods/metadcseg.py",
    "jnp.argmax(logits, -1), normalizer=",
    'batch["noisy_label"], normalizer=',
    METHOD_TESTS,
    equivalent="with meta off b̂ = 0 and πb = 0, so the pseudo-labels' loss g is weighted by 0 "
    "in every term",
  ),
  # ---------------------------------------------------------------- stats.py
  Mutant(
    "stats_var_without_residual",  # the interaction counted twice
    "metadcseg_jax/benchmark/stats.py",
    "var = v_seed + v_test - v_res",
    "var = v_seed + v_test",
    STATS_TESTS,
  ),
  Mutant(
    "stats_normal_quantile_unless_capped",  # where the S − 1 rule does not fire
    "metadcseg_jax/benchmark/stats.py",
    "df = var * var / denom if denom > 0 else math.inf",
    "df = math.inf",
    STATS_TESTS,
  ),
  Mutant(
    "stats_satterthwaite_without_residual",
    "metadcseg_jax/benchmark/stats.py",
    ' + v_res**2 / parts["df_res"]',
    "",
    STATS_TESTS,
  ),
  Mutant(
    "stats_rule_keyed_on_v_seed",  # the seed part with the interaction in it
    "metadcseg_jax/benchmark/stats.py",
    "if max(v_seed - v_res, 0.0) >= 0.5 * var:",
    "if v_seed >= 0.5 * var:",
    STATS_TESTS,
  ),
  Mutant(
    "stats_power_normal_approximation",
    "metadcseg_jax/benchmark/stats.py",
    "return float(scipy_stats.nct.sf(crit, df, shift))",
    "return float(scipy_stats.norm.sf(crit - shift))",
    STATS_TESTS,
  ),
]


def _copy_repo(dest: pathlib.Path) -> None:
  """The working tree as it is (tracked and untracked files git does not ignore)."""
  listed = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=ROOT,
    capture_output=True,
    check=True,
  ).stdout.split(b"\0")
  for name in filter(None, listed):
    src = ROOT / name.decode()
    if src.is_file():
      target = dest / name.decode()
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, target)


def _env(copy: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
  env.pop("METADCSEG_SLOW", None)
  env.pop("XLA_FLAGS", None)
  return env


def _pytest(copy: pathlib.Path, tests, timeout: int) -> tuple[bool, str, float]:
  """(passed, first failing test or error, seconds) of the tests in the copy, stopping at the
  first failure."""
  t0 = time.perf_counter()
  try:
    out = subprocess.run(
      [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
      cwd=copy,
      env=_env(copy),
      capture_output=True,
      text=True,
      timeout=timeout,
    )
  except subprocess.TimeoutExpired:
    return False, "timeout", time.perf_counter() - t0
  seconds = time.perf_counter() - t0
  if out.returncode == 0:
    return True, "", seconds
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)
  return False, failed[0] if failed else out.stdout[-300:].strip(), seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="Comma-separated mutant names.")
  parser.add_argument(
    "--files",
    default="",
    help="Comma-separated files: only their mutants (metadcseg_jax/benchmark/stats.py).",
  )
  parser.add_argument("--list", action="store_true", help="List the mutants and exit.")
  parser.add_argument("--timeout", type=int, default=900, help="Seconds per test run.")
  args = parser.parse_args()
  mutants = MUTANTS
  if args.only:
    wanted = set(args.only.split(","))
    unknown = wanted - {m.name for m in MUTANTS}
    if unknown:
      parser.error(f"unknown mutants: {sorted(unknown)}")
    mutants = [m for m in MUTANTS if m.name in wanted]
  if args.files:
    paths = set(args.files.split(","))
    unknown = paths - {m.path for m in MUTANTS}
    if unknown:
      parser.error(f"no mutants in {sorted(unknown)}")
    mutants = [m for m in mutants if m.path in paths]
  if args.list:
    for m in mutants:
      print(f"{m.name}: {m.path}: {m.old!r} -> {m.new!r}")
    return 0

  with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
    copy = pathlib.Path(tmp) / "repo"
    _copy_repo(copy)
    where = subprocess.run(
      [sys.executable, "-c", "import metadcseg_jax; print(metadcseg_jax.__file__)"],
      cwd=copy,
      env=_env(copy),
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    assert where.startswith(str(copy)), f"the copy is not what the tests import: {where}"
    for m in mutants:  # every mutation must apply to exactly one place, before anything runs
      count = (copy / m.path).read_text().count(m.old)
      assert count == 1, f"{m.name}: {m.old!r} occurs {count} times in {m.path}"
    tests = sorted({t for m in mutants for t in m.tests})
    ok, failed, seconds = _pytest(copy, tests, args.timeout)
    print(f"unmutated copy: {'pass' if ok else 'FAIL ' + failed} ({seconds:.0f} s)", flush=True)
    if not ok:
      return 2
    print("| mutant | file | change | result | killed by | s |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for m in mutants:
      path = copy / m.path
      original = path.read_text()
      path.write_text(original.replace(m.old, m.new))
      try:
        survived, failed, seconds = _pytest(copy, m.tests, args.timeout)
      finally:
        path.write_text(original)
      if survived:
        result = "survived (equivalent)" if m.equivalent else "**SURVIVED**"
        bad += not m.equivalent
      else:
        result = "killed (marked equivalent!)" if m.equivalent else "killed"
        bad += bool(m.equivalent)
      change = f"`{m.old.strip()}` → `{m.new.strip()}`".replace("\n", " ").replace("|", "\\|")
      why = m.equivalent if survived else failed
      print(f"| {m.name} | {m.path} | {change} | {result} | {why} | {seconds:.0f} |", flush=True)
  print(f"{len(mutants)} mutants, {bad} unexpected")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
