r"""How long each compiled function of a run takes to compile, without and with JAX's persistent
compilation cache (the trainer keeps it under `<data_dir>/jax_compilation_cache`).

    python -m experiments.compile_times --config=experiments/configs/synthetic.py
    python -m experiments.compile_times --config=experiments/configs/tiny.py

Runs itself twice in fresh processes on one empty cache folder: "cold" (nothing cached) and
"warm" (the same programs again, as a second run of the same config). Each function is called
twice on the config's shapes; "compile" is the first call minus the second (tracing, lowering
and compiling, or loading from the cache), "run" the second call. Prints a markdown table.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from metadcseg_jax.training import evaluate
from metadcseg_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
_CACHE = flags.DEFINE_string("cache_dir", "", "Internal: measure once with this cache folder.")
flags.mark_flags_as_required(["config"])


def _twice(fn, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  t1 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  t2 = time.perf_counter()
  return (t1 - t0) - (t2 - t1), t2 - t1


def _measure(config) -> dict[str, tuple[float, float]]:
  """{function: (compile s, run s)} for one process."""
  t = config.train
  s, c = config.data.size, config.data.channels
  rng = np.random.default_rng(0)
  label = jnp.asarray(rng.integers(0, 2, (t.batch_size, s, s)), jnp.int32)
  batch = {
    "image": jnp.asarray(rng.standard_normal((t.batch_size, s, s, c)), jnp.float32),
    "noisy_label": label,
    "meta_image": jnp.asarray(rng.standard_normal((t.meta_batch_size, s, s, c)), jnp.float32),
    "meta_label": label[: t.meta_batch_size],
  }
  out = {}
  t0 = time.perf_counter()
  compiled = train.compiled_for(config, steps_per_epoch=98)
  method = compiled.method
  state = method.init_state(jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  out["init (incl. model build)"] = (time.perf_counter() - t0, float("nan"))
  phases = sorted({method.phase(e) for e in range(t.num_epochs)})
  for phase in phases:
    step = jax.jit(method.train_step(phase))  # not donated: called twice on one state
    out[f"train step '{phase}'"] = _twice(step, state, batch, jax.random.PRNGKey(1))
  images = np.zeros((t.eval_batch_size, s, s, c), np.float32)
  predictor = evaluate.Predictor(method)
  for variant in ("raw", "ema"):
    out[f"predict '{variant}'"] = _twice(
      lambda: predictor.probs(state, images, variant=variant, batch_size=t.eval_batch_size)
    )
  if method.figure_name:
    out[f"explain ({method.figure_name})"] = _twice(lambda: method.explain(state, batch))
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  if _CACHE.value:  # one measurement, in this process
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print(json.dumps(_measure(config)))
    return
  with tempfile.TemporaryDirectory() as cache:
    rows = {}
    for name in ("cold", "warm"):
      cmd = [
        sys.executable,
        "-m",
        "experiments.compile_times",
        f"--cache_dir={cache}",
        *[a for a in sys.argv[1:] if not a.startswith("--cache_dir")],
      ]
      t0 = time.perf_counter()
      done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")},
        cwd=pathlib.Path(__file__).resolve().parents[1],
      )
      rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
      rows[name]["process (imports included)"] = (time.perf_counter() - t0, float("nan"))
  print(
    f"{jax.devices()[0].device_kind}, method {config.method}, {config.data.size}px, "
    f"width {config.model.width}, batch {config.train.batch_size}"
  )
  print("| function | compile, cold (s) | compile, warm cache (s) | run (s) |")
  print("|---|---|---|---|")
  for key in rows["cold"]:
    cold, run = rows["cold"][key]
    warm, _ = rows["warm"][key]
    print(f"| {key} | {cold:.2f} | {warm:.2f} | {run:.3f} |")


if __name__ == "__main__":
  app.run(main)
