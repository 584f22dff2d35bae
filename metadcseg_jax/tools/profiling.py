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
_TYPED_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_BYTES_PER_ELEMENT = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
  opcode: str
  op_name: str
  flops: float  # convolutions only (0 otherwise)
  bytes: float = 0.0  # the operands read and the result written, as laid out in memory
  name: str = ""


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


def _result_bytes(rest: str, opcode: str) -> float:
  """Bytes of an instruction's result: every typed shape before its opcode (a tuple has
  several)."""
  head = rest.split(f" {opcode}(", 1)[0] if opcode else rest
  return float(
    sum(
      _BYTES_PER_ELEMENT.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
      for dtype, dims in _TYPED_SHAPE.findall(head)
    )
  )


def _operand_names(rest: str, opcode: str) -> list[str]:
  args = re.search(re.escape(opcode) + r"\(([^)]*)\)", rest) if opcode else None
  return re.findall(r"%([\w.\-]+)", args.group(1)) if args else []


def parse_hlo(text: str) -> dict[str, Instruction]:
  """{instruction name: Instruction} of every instruction in an HLO module's text; a fusion or
  call counts the convolution FLOPs of the computation it calls. `bytes` is the memory an
  instruction touches from outside: its operands' results and its own (a fusion's inner
  values stay in registers and are not counted)."""
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
  own, result_bytes = {}, {}
  for name, rest in lines:
    op = _OPCODE.search(" " + rest)
    opcode = op.group(1) if op else ""
    op_name = _OP_NAME.search(rest)
    flops = _conv_flops(rest, shapes) if opcode == "convolution" else 0.0
    result_bytes[name] = _result_bytes(rest, opcode)
    own[name] = (
      opcode,
      op_name.group(1) if op_name else "",
      flops,
      _CALLS.findall(rest),
      _operand_names(rest, opcode),
    )
  out = {}
  for name, (opcode, op_name, flops, calls, operands) in own.items():
    flops += sum(own[i][2] for c in calls for i in members.get(c, ()))
    moved = result_bytes[name] + sum(result_bytes.get(o, 0.0) for o in operands)
    out[name] = Instruction(opcode, op_name, flops, moved, name)
  return out


def category(inst: Instruction) -> str:
  """ "<scope>: <kind>" of an instruction (module doc)."""
  name = inst.op_name
  scope = "meta" if "meta_weights" in name else ("dcd" if re.search(r"\bdcd\b", name) else "step")
  if inst.flops or name.endswith("conv_general_dilated"):
    kind = "conv backward" if "transpose(" in name else "conv forward"
  elif inst.opcode in ("copy", "transpose") or re.match(r"(wrapped_)?(transpose|copy)", inst.name):
    kind = "relayout"
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

  Args:
    step: the unjitted step.
    state: its state (donated: not used after the call).
    feed: its batch.
    repeats: the timed and the profiled runs, each.
    rng: the step's random key (None: PRNGKey(0)).

  Returns:
    {"step_s": median wall seconds per step (unprofiled runs), "categories": {category:
    {"s": seconds per step, "share": of the traced op time, "gflop": per step, "gflops":
    GFLOP/s, "gbytes": memory touched per step, "gbps": GB/s}}, "traced_s": traced op
    seconds per step, "xla_gflop": XLA's cost analysis}.
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
  moved: dict[str, float] = collections.defaultdict(float)
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")
    if e.get("ph") != "X" or op is None or op not in instructions:
      continue
    inst = instructions[op]
    cat = category(inst)
    seconds[cat] += e["dur"] * 1e-6 / repeats
    flops[cat] += inst.flops / repeats
    moved[cat] += inst.bytes / repeats
  total = sum(seconds.values())
  cats = {
    c: {
      "s": s,
      "share": s / total if total else 0.0,
      "gflop": flops[c] * 1e-9,
      "gflops": flops[c] * 1e-9 / s if s and flops[c] else None,
      "gbytes": moved[c] * 1e-9,
      "gbps": moved[c] * 1e-9 / s if s else None,
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


def roofline(
  *, matmul_size: int = 1024, copy_mib: float = 4, repeats: int = 10
) -> dict[str, float]:
  """What the device this process runs on does at best, measured through XLA.

  "peak_gflops": a float32 matrix product (`matmul_size`², compute-bound, the library
  kernel's rate), the practical FLOP peak; "copy_gbps": a jitted copy-and-scale of a
  `copy_mib` MiB float32 array (bytes read + written per second), the bandwidth of memory
  traffic at the size of the step's activations. Medians over `repeats` runs.
  """

  def rate(fn, x, work):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times.append(time.perf_counter() - start)
    times.sort()
    return work / times[len(times) // 2] * 1e-9

  a = jax.random.normal(jax.random.PRNGKey(0), (matmul_size, matmul_size), jax.numpy.float32)
  v = jax.numpy.ones((int(copy_mib * 2**18),), jax.numpy.float32)
  return {
    "peak_gflops": rate(lambda m: m @ m, a, 2.0 * matmul_size**3),
    "copy_gbps": rate(lambda u: u * 2.0, v, 2.0 * v.nbytes),
  }


def floor_seconds(category: dict[str, float], roof: dict[str, float]) -> float:
  """The least time a category's work could take on `roof`'s device: its FLOPs at the peak or
  its bytes at the copy bandwidth, whichever is longer (the roofline bound)."""
  return max(
    category["gflop"] / roof["peak_gflops"] if category["gflop"] else 0.0,
    category["gbytes"] / roof["copy_gbps"],
  )


def markdown(title: str, profile: dict[str, Any], roof: dict[str, float] | None = None) -> str:
  """One table of `profile_step`'s result; with `roof` (from `roofline`), each category's
  least possible time ("floor") and how far above it the category runs."""
  out = [
    f"**{title}**: {profile['step_s'] * 1e3:.0f} ms per step, {profile['traced_s'] * 1e3:.0f} ms "
    f"in traced XLA operations, {profile['xla_gflop']:.2f} GFLOP (XLA's cost analysis)",
    "",
  ]
  head = "| category | ms per step | share | conv GFLOP | GFLOP/s | GB moved | GB/s |"
  rule = "|---|---|---|---|---|---|---|"
  if roof:
    head += " floor ms | × floor |"
    rule += "---|---|"
  out += [head, rule]
  floors = 0.0
  for c, v in profile["categories"].items():
    rate = f"{v['gflops']:.1f}" if v["gflops"] else "-"
    gflop = f"{v['gflop']:.2f}" if v["gflop"] else "-"
    row = (
      f"| {c} | {v['s'] * 1e3:.1f} | {v['share']:.0%} | {gflop} | {rate} | "
      f"{v['gbytes']:.3f} | {v['gbps'] or 0.0:.1f} |"
    )
    if roof:
      floor = floor_seconds(v, roof)
      floors += floor
      row += f" {floor * 1e3:.1f} | {v['s'] / floor if floor else float('inf'):.1f} |"
    out.append(row)
  if roof:
    out += [
      "",
      f"Floor of the traced operations: {floors * 1e3:.1f} ms per step "
      f"({floors / profile['traced_s']:.0%} of their {profile['traced_s'] * 1e3:.0f} ms) at "
      f"{roof['peak_gflops']:.0f} GFLOP/s and {roof['copy_gbps']:.0f} GB/s measured on this "
      "device.",
    ]
  return "\n".join(out)
