r"""Where a jitted step's time goes: XLA's own per-operation trace, grouped by kind of work.

`profile_step` runs a compiled step under `jax.profiler` (host tracer level 3: the CPU runtime
records every executed HLO operation) and joins each traced operation with its instruction in
the compiled HLO: its opcode, the `op_name` metadata JAX writes (the transformation and module
path, e.g. `jit(step)/transpose(jvp(UNetPlusPlus))/conv0_1/conv2/conv_general_dilated`) and,
for convolutions, the FLOPs computed from the operand shapes. Categories:

* scope: "meta" for operations under the `meta_weights` named scope (the virtual step and the
  meta-gradients Ga, Gb of MetaDCSeg App. A.3), "dcd" under `dcd` (the DCD weights of Eq. 12,
  from the regions of Eq. 8 on), else "step"
  (the forward at θ, the loss and the real backward and update);
* kind: "conv forward", "conv backward" (`transpose(` in op_name: input and weight
  gradients), "batchnorm" (the networks' bn modules), "other" (fusions of elementwise work,
  reductions, copies).
"""

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
  opcode: str
  op_name: str
  flops: float  # convolutions only (0 otherwise)


def _dims(shape_text: str) -> list[int]:
  m = _SHAPE.match(shape_text.strip())
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _conv_flops(rest: str, shapes: dict[str, list[int]]) -> float:
  """2·(output elements)·(kernel elements / output features) of one HLO convolution; operand
  shapes come from their defining instructions (`shapes`), or inline where HLO prints them."""
  labels = _DIM_LABELS.search(rest)
  args = re.search(r"convolution\((.*?)\)", rest)
  if labels is None or args is None:
    return 0.0
  operands = [a.strip() for a in args.group(1).split(",") if a.strip()]
  kernel_text = operands[-1] if len(operands) >= 2 else ""
  name = kernel_text.split()[-1].lstrip("%") if kernel_text else ""
  kernel = shapes.get(name) or _dims(kernel_text)
  out = _dims(rest)
  if not kernel or not out:
    return 0.0
  out_feature = kernel[labels.group(2).index("o")]
  return 2.0 * math.prod(out) * math.prod(kernel) / max(out_feature, 1)


def parse_hlo(text: str) -> dict[str, Instruction]:
  """{instruction name: Instruction} of every instruction in an HLO module's text; a fusion or
  call counts the convolution FLOPs of the computation it calls."""
  lines, computation, members = [], "", collections.defaultdict(list)
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if m:
      lines.append(m.groups())
      members[computation].append(m.group(1))
  shapes = {name: _dims(rest) for name, rest in lines}
  own = {}
  for name, rest in lines:
    op = _OPCODE.search(" " + rest)
    opcode = op.group(1) if op else ""
    op_name = _OP_NAME.search(rest)
    flops = _conv_flops(rest, shapes) if opcode == "convolution" else 0.0
    own[name] = (opcode, op_name.group(1) if op_name else "", flops, _CALLS.findall(rest))
  out = {}
  for name, (opcode, op_name, flops, calls) in own.items():
    flops += sum(own[i][2] for c in calls for i in members.get(c, ()))
    out[name] = Instruction(opcode, op_name, flops)
  return out


def category(inst: Instruction) -> str:
  """ "<scope>: <kind>" of an instruction (module doc)."""
  name = inst.op_name
  scope = "meta" if "meta_weights" in name else ("dcd" if re.search(r"\bdcd\b", name) else "step")
  if inst.flops or name.endswith("conv_general_dilated"):
    kind = "conv backward" if "transpose(" in name else "conv forward"
  elif re.search(r"/bn\d?/|BatchNorm", name):
    kind = "batchnorm"
  else:
    kind = "other"
  return f"{scope}: {kind}"


def _trace_events(trace_dir: str) -> list[dict[str, Any]]:
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def profile_step(
  step: Callable, state: Any, feed: Any, *, repeats: int = 3, rng=None
) -> dict[str, Any]:
  """Per-category time of a step `(state, batch, rng) -> (state, metrics)`.

  The step is jitted with the state donated, compiled and run once, timed `repeats` times, then
  run `repeats` times under the profiler.

  Returns:
    {"step_s": median wall seconds per step (unprofiled runs), "categories": {category:
    {"s": seconds per step, "share": of the traced op time, "gflop": per step, "gflops":
    GFLOP/s}}, "traced_s": traced op seconds per step, "xla_gflop": XLA's cost analysis}.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  jitted = jax.jit(step, donate_argnums=(0,))
  compiled = jitted.lower(state, feed, rng).compile()
  instructions = parse_hlo(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, out = compiled(state, feed, rng)
  jax.block_until_ready((state, out))
  options = jax.profiler.ProfileOptions()
  options.host_tracer_level = 3
  options.python_tracer_level = 0
  walls = []
  for i in range(repeats):  # timed without the profiler, whose tracing costs wall time
    start = time.perf_counter()
    state, out = compiled(state, feed, jax.random.fold_in(rng, i))
    jax.block_until_ready((state, out))
    walls.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=options)
    try:
      for i in range(repeats):
        state, out = compiled(state, feed, jax.random.fold_in(rng, i))
        jax.block_until_ready((state, out))
    finally:
      jax.profiler.stop_trace()
    events = _trace_events(trace_dir)
  seconds: dict[str, float] = collections.defaultdict(float)
  flops: dict[str, float] = collections.defaultdict(float)
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")
    if e.get("ph") != "X" or op is None or op not in instructions:
      continue
    inst = instructions[op]
    cat = category(inst)
    seconds[cat] += e["dur"] * 1e-6 / repeats
    flops[cat] += inst.flops / repeats
  total = sum(seconds.values())
  cats = {
    c: {
      "s": s,
      "share": s / total if total else 0.0,
      "gflop": flops[c] * 1e-9,
      "gflops": flops[c] * 1e-9 / s if s and flops[c] else None,
    }
    for c, s in sorted(seconds.items(), key=lambda kv: -kv[1])
  }
  walls.sort()
  return {
    "step_s": walls[len(walls) // 2],
    "traced_s": total,
    "categories": cats,
    "xla_gflop": float(cost.get("flops", 0.0)) * 1e-9 if cost else None,
  }


def markdown(title: str, profile: dict[str, Any]) -> str:
  """One table of `profile_step`'s result."""
  out = [
    f"**{title}**: {profile['step_s'] * 1e3:.0f} ms per step, {profile['traced_s'] * 1e3:.0f} ms "
    f"in traced XLA operations, {profile['xla_gflop']:.2f} GFLOP (XLA's cost analysis)",
    "",
    "| category | ms per step | share | conv GFLOP | GFLOP/s |",
    "|---|---|---|---|---|",
  ]
  for c, v in profile["categories"].items():
    rate = f"{v['gflops']:.1f}" if v["gflops"] else "-"
    gflop = f"{v['gflop']:.2f}" if v["gflop"] else "-"
    out.append(f"| {c} | {v['s'] * 1e3:.1f} | {v['share']:.0%} | {gflop} | {rate} |")
  return "\n".join(out)
