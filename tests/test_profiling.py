"""Tests of metadcseg_jax/tools/profiling.py: HLO parsing (FLOPs of a convolution worked by hand,
the categories) and one profiled step."""

import jax
import jax.numpy as jnp
import numpy as np

from metadcseg_jax.tools import profiling


def _conv(x, k):
  return jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def test_convolution_flops_from_the_hlo():
  x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  text = jax.jit(_conv).lower(x, k).compile().as_text()
  flops = [i.flops for i in profiling.parse_hlo(text).values() if i.flops]
  # 2 FLOPs per multiply-add: 2 · (2·8·8·5 outputs) · (3·3·3 taps each).
  assert 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3) in flops


def test_bytes_moved_from_the_hlo():
  # One elementwise fusion: reads f32[2,8,8,3] (768 bytes), writes the same.
  text = jax.jit(lambda x: jnp.tanh(x) * 3.0).lower(jnp.ones((2, 8, 8, 3))).compile().as_text()
  moved = [i.bytes for i in profiling.parse_hlo(text).values() if i.opcode == "fusion"]
  assert moved == [2 * 2 * 8 * 8 * 3 * 4]


def test_floor_is_the_roofline_bound():
  roof = {"peak_gflops": 100.0, "copy_gbps": 10.0}
  # Compute-bound: 2 GFLOP at 100 GFLOP/s = 20 ms > 0.05 GB at 10 GB/s = 5 ms.
  assert profiling.floor_seconds({"gflop": 2.0, "gbytes": 0.05}, roof) == 0.02
  # Memory-bound: no FLOPs counted, 0.3 GB at 10 GB/s = 30 ms.
  assert abs(profiling.floor_seconds({"gflop": 0.0, "gbytes": 0.3}, roof) - 0.03) < 1e-15


def test_categories():
  inst = lambda op_name, flops=0.0: profiling.Instruction("fusion", op_name, flops)
  assert profiling.category(inst("jit(step)/meta_weights/transpose(jvp(U))/c", 1.0)) == (
    "meta: conv backward"
  )
  assert profiling.category(inst("jit(step)/jvp(U)/conv0_0/conv1/conv_general_dilated")) == (
    "step: conv forward"
  )
  assert profiling.category(inst("jit(step)/jvp(dcd)/mul")) == "dcd: other"
  assert profiling.category(inst("jit(step)/jvp(U)/conv0_0/bn1/mean")) == "step: batchnorm"
  assert profiling.category(inst("jit(step)/dcdx/mul")) == "step: other"
  relayout = profiling.Instruction("fusion", "", 0.0, 64.0, "transpose_copy_fusion.3")
  assert profiling.category(relayout) == "step: relayout"
  assert profiling.category(profiling.Instruction("copy", "jit(step)/x", 0.0)) == "step: relayout"


def test_profile_step_times_the_operations():
  def step(state, batch, rng):
    del rng
    loss = lambda k: jnp.mean(_conv(batch["image"], k) ** 2)
    grads = jax.grad(loss)(state)
    return state - 0.1 * grads, {"loss": loss(state)}

  state = jnp.ones((3, 3, 3, 4))
  batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)}
  out = profiling.profile_step(step, state, batch, repeats=2)
  cats = out["categories"]
  assert "step: conv forward" in cats and "step: conv backward" in cats
  assert out["step_s"] > 0 and out["traced_s"] > 0
  assert abs(sum(c["share"] for c in cats.values()) - 1.0) < 1e-9
  assert cats["step: conv forward"]["gflop"] > 0
  assert "| step: conv forward |" in profiling.markdown("t", out)
  assert cats["step: conv forward"]["gbytes"] > 0
  roof = profiling.roofline(matmul_size=64, copy_mib=1, repeats=2)
  assert roof["peak_gflops"] > 0 and roof["copy_gbps"] > 0
  assert "Floor of the traced operations" in profiling.markdown("t", out, roof)
