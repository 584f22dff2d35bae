"""The installed console scripts, run as a new user would: the quick start end to end, its
TensorBoard events, resume, the corruption and benchmark commands, every command's --help, and
user errors as one line.

Each command is a subprocess of the console script pip installed beside this interpreter. They
share one data folder, so JAX's persistent compilation cache under it serves the later runs.
"""

import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest

from metadcseg_jax import cli
from metadcseg_jax.commands import bench
from metadcseg_jax.commands import speed
from metadcseg_jax.commands import throughput as throughput_command

from metadcseg_jax.training import summaries

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "configs" / "tiny.py")
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _script(name: str) -> str:
  path = pathlib.Path(sys.executable).parent / name
  found = str(path) if path.exists() else shutil.which(name)
  assert found, f"{name} is not installed: pip install -e . first"
  return found


@pytest.fixture(scope="module")
def data_dir(run_data_dir):
  return run_data_dir


def _run(args, *, env=None, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
  return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_start(data_dir, tmp_path_factory):
  """The quick start on the tiny config, with every imported module listed (-X importtime)."""
  workdir = tmp_path_factory.mktemp("quick") / "run"
  out = _run(
    [
      _script("metadcseg-train"),
      f"--config={TINY}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
    ],
    env={"PYTHONPROFILEIMPORTTIME": "1"},
  )
  return workdir, out


def test_quick_start_writes_every_output(quick_start):
  workdir, out = quick_start
  assert out.returncode == 0, out.stderr[-3000:]
  for name in (
    "results.json",
    "metrics.jsonl",
    "panel.png",
    "curves.png",
    "dcd.png",
    "config.json",
    "config_history.jsonl",
    "data_info.json",
  ):
    assert (workdir / name).stat().st_size > 0, name
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  assert "final test Dice" in out.stdout and str(workdir / "results.json") in out.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert results["epoch"] == 2 and 0.0 <= results["test"]["ema"]["dice"] <= 1.0
  # The progress lines: epoch, step, loss, images/s, time left.
  assert "epoch 2/2 step" in out.stderr and "img/s" in out.stderr and "left" in out.stderr


def _duplicated_steps(logdir) -> list[tuple[str, int]]:
  counts = collections.Counter((e["tag"], e["step"]) for e in summaries.read(logdir))
  return [key for key, n in counts.items() if n > 1]


def test_quick_start_writes_tensorboard_events_and_says_how_to_see_them(quick_start):
  workdir, out = quick_start
  assert out.returncode == 0, out.stderr[-3000:]
  series = summaries.scalars(workdir)
  steps = [s for s, _ in series["train/loss"]]
  assert len(steps) == 2 and steps == sorted(set(steps))  # one point per epoch
  for tag in ("train/lr", "train/images_per_s"):
    assert [s for s, _ in series[tag]] == steps, tag
  # The loss terms of MetaDCSeg's epoch (the first is its warm-up on plain CE).
  assert {"train/ce_term", "train/bd_term", "train/dice_term"} <= set(series)
  for params in ("raw", "ema"):  # the validation after each epoch
    for metric in ("dice", "iou", "hd95"):
      assert [s for s, _ in series[f"val/{params}/{metric}"]] == steps, (params, metric)
  assert {"diagnostics/grad_norm_total", "diagnostics/alpha_share"} <= set(series)
  results = json.loads((workdir / "results.json").read_text())
  for params in ("raw", "ema"):  # the test split, scored once at the end
    for metric in ("dice", "iou", "hd95"):
      ((step, value),) = series[f"test/{params}/{metric}"]
      assert step == steps[-1]
      assert value == pytest.approx(results["test"][params][metric], rel=1e-6, nan_ok=True)
  images = {e["tag"]: e for e in summaries.read(workdir) if "image" in e}
  assert sorted(images) == ["figures/dcd", "figures/panel"]
  assert images["figures/panel"]["image"] == (workdir / "panel.png").read_bytes()
  assert images["figures/panel"]["step"] == steps[-1]
  assert _duplicated_steps(workdir) == []
  # The run ends naming what to open and how to watch it.
  assert out.stdout.strip().splitlines()[-1] == f"tensorboard: tensorboard --logdir {workdir}"


def test_quick_start_imports_only_declared_dependencies(quick_start, deps):
  _, out = quick_start
  modules = deps.modules_from_importtime(out.stderr)
  assert "metadcseg_jax.training.train" in modules and "orbax.checkpoint" in modules
  assert deps.undeclared(modules) == {}


def test_second_invocation_resumes_instead_of_retraining(quick_start, data_dir):
  workdir, first = quick_start
  before = (workdir / "results.json").read_text()
  out = _run(
    [
      _script("metadcseg-train"),
      f"--config={TINY}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr and "at epoch 2" in out.stderr
  assert "epoch 1/2" not in out.stderr  # nothing trained again
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records if r["split"] == "train"] == [1, 2]
  assert json.loads((workdir / "results.json").read_text())["test"] == json.loads(before)["test"]
  assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 2
  # The event files were rewritten from the kept records, the figures written once again.
  assert _duplicated_steps(workdir) == []
  assert len(list(workdir.glob(summaries.EVENTS_GLOB))) == 1
  assert sorted(e["tag"] for e in summaries.read(workdir) if "image" in e) == [
    "figures/dcd",
    "figures/panel",
  ]


def test_corrupt_command(data_dir):
  out = _run(
    [
      _script("metadcseg-corrupt"),
      f"--config={TINY}",
      f"--config.data.data_dir={data_dir}",
      "--kinds=l2b20,l2b60",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| l2b")]
  assert [r.split("|")[1].strip() for r in rows] == ["l2b20", "l2b60"]
  assert float(rows[1].split("|")[3]) > float(rows[0].split("|")[3])


def test_benchmark_command(data_dir, tmp_path):
  """`metadcseg-benchmark` on a small grid: one method, clean labels, two seeds trained at once
  in two worker processes; a rerun finds the runs finished and trains nothing."""
  args = [
    _script("metadcseg-benchmark"),
    f"--config={TINY}",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    "--methods=ce",
    "--noise=none",
    "--seeds=0,1",
    "--processes=2",
  ]
  out = _run(args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "none" / "ce" / "seed0" / "results.json").is_file()
  assert (tmp_path / "dice_vs_noise.png").stat().st_size > 0
  assert summaries.scalars(tmp_path / "none" / "ce" / "seed0")["val/ema/dice"]
  assert f"plot: {tmp_path / 'dice_vs_noise.png'}" in out.stdout
  assert out.stdout.strip().splitlines()[-1].endswith(f"tensorboard --logdir {tmp_path}")
  table = (tmp_path / "benchmark.md").read_text()
  assert "| ce | " in table and "--methods=ce" in table
  cells = json.loads((tmp_path / "benchmark.json").read_text())["cells"]
  assert [(c["noise"], c["label"], c["seeds"]) for c in cells] == [("none", "ce", [0, 1])]
  assert out.stdout.count(": queued, trains in") == 2
  mtime = (tmp_path / "none" / "ce" / "seed0" / "results.json").stat().st_mtime_ns
  again = _run(args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (tmp_path / "none" / "ce" / "seed0" / "results.json").stat().st_mtime_ns == mtime


def test_speed_command_times_each_step_and_the_meta_over_plain_ratio():
  out = _run(
    [
      _script("metadcseg-speed"),
      "--sizes=32",
      "--widths=4",
      "--channels=1",
      "--methods=ce,l2b_jvp",
      "--repeats=1",
      "--batches=2",
      "--notorch",
      "--noflops",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "32px, width 4, 1 ch, float32" in out.stdout
  for step in ("ce", "l2b_jvp"):
    (row,) = [l for l in out.stdout.splitlines() if l.startswith(f"| {step} | 2 |")]
    ms, images_per_s = (float(c) for c in row.strip("|").split("|")[2:5:2])
    assert ms > 0 and images_per_s > 0
  assert "size 32 width 4 ch 1 batch 2: l2b_jvp/ce " in out.stdout
  assert "meta/plain ratio:" in out.stdout


def test_the_old_speed_names_translate_their_flags():
  """metadcseg-bench and metadcseg-throughput run metadcseg-speed with the flags renamed and,
  for metadcseg-bench, its own defaults where the user gave none."""
  args = speed.translate(["--steps=ce", "--batch=4", "--repeats=1"], bench.RENAMED, bench.DEFAULTS)
  assert args[:3] == ["--methods=ce", "--batches=4", "--repeats=1"]
  assert set(args[3:]) == {"--sizes=128", "--widths=16,32", "--channels=1,3", "--noflops"}
  assert speed.translate(["--size=64", "--width=8", "--notorch"], throughput_command.RENAMED) == [
    "--sizes=64",
    "--widths=8",
    "--notorch",
  ]


@pytest.mark.parametrize(
  "extra, message",
  [
    (
      ["--config.train.lrr=3"],
      "error: unknown config setting in --config.train.lrr=3 (did you "
      "mean \"lr\" instead of \"lrr\"?)",
    ),
    (["--config.train.batch_size=0"], "error: config.train.batch_size must be >= 1, got 0"),
    (["--config.data.name=kvasir"], "error: config.data.name must be one of ('synthetic', "),
    (["--config.train.lr=abc"], "error: flag --config.train.lr=abc: could not convert"),
  ],
)
def test_user_errors_are_one_line(extra, message, tmp_path):
  out = _run(
    [_script("metadcseg-train"), f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *extra]
  )
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines[0].startswith(message), out.stderr
  assert "Traceback" not in out.stderr and len(lines) <= 2


def test_workdir_errors_are_one_line_and_debug_keeps_the_traceback(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  out = _run([_script("metadcseg-train"), f"--config={TINY}", f"--workdir={not_a_dir}"])
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert (
    out.stderr.strip() == f"error: workdir {not_a_dir} exists and is not a directory: pass a folder"
  )
  out = _run(
    [_script("metadcseg-train"), f"--config={TINY}", f"--workdir={not_a_dir}", "--verbosity=1"]
  )
  assert out.returncode != 0 and "Traceback" in out.stderr and "WorkdirError" in out.stderr


def test_a_busy_workdir_is_refused_with_the_holder_named(tmp_path):
  workdir = tmp_path / "busy"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    (workdir / ".lock").write_text(
      json.dumps(
        {"pid": holder.pid, "host": os.uname().nodename, "started": "now", "process_start": None}
      )
    )
    out = _run([_script("metadcseg-train"), f"--config={TINY}", f"--workdir={workdir}"])
  finally:
    holder.kill()
    holder.wait()
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert f"is in use by pid {holder.pid}" in out.stderr
  assert not (workdir / "metrics.jsonl").exists()  # the busy run's files untouched


# ------------------------------------------------------------ --help and mistakes, in-process

# Console-script entry points called as the scripts call them, with sys.argv set, in one
# interpreter so that JAX and the rest are imported once, not once per command (each command's
# flags are removed before the next command's module is imported). For each call: the exit
# status, stdout, everything written to stderr (absl's log lines included), and the flags the
# command defines.
_DRIVER = textwrap.dedent(
  """
  import contextlib, importlib, io, json, os, sys
  from absl import app, flags, logging
  app.define_help_flags()  # absl's own flags stay; the commands' are removed between them
  FLAGS = flags.FLAGS
  baseline, loaded, results = set(FLAGS), None, []
  for call in json.loads(sys.argv[1]):
    module_name, function = call["target"].split(":")
    if module_name != loaded:
      for flag in [f for f in list(FLAGS) if f not in baseline]:
        if flag in FLAGS:
          delattr(FLAGS, flag)
      module, loaded = importlib.import_module(module_name), module_name
    FLAGS.unparse_flags()
    os.chdir(call["cwd"])
    sys.argv = call["argv"]
    out, err = io.StringIO(), io.StringIO()
    logging.get_absl_handler().python_handler.stream = err
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        getattr(module, function)()
        code = "returned"
      except SystemExit as e:
        code = e.code
    logging.get_absl_handler().python_handler.stream = sys.__stderr__
    own = [f.name for f in FLAGS.get_key_flags_for_module(module_name)]
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "flags": own})
  print(json.dumps(results))
  """
)


def _call_entry_points(calls: list[dict]) -> list[dict]:
  """`calls`: {"script", "argv" (after the script's name), "cwd"}; a script whose flags its
  entry function defines (audit, throughput) is called once."""
  order = sorted(range(len(calls)), key=lambda i: list(SCRIPTS).index(calls[i]["script"]))
  payload = [
    {
      "target": SCRIPTS[calls[i]["script"]],
      "argv": [calls[i]["script"], *calls[i]["argv"]],
      "cwd": str(calls[i].get("cwd", ROOT)),
    }
    for i in order
  ]
  out = _run([sys.executable, "-c", _DRIVER, json.dumps(payload)])
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.splitlines()[-1])
  return [results[order.index(i)] for i in range(len(calls))]


def _read_only_folder(tmp_path) -> pathlib.Path | None:
  """A folder this process cannot create anything in (root ignores permissions: /sys)."""
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o555)
  if not os.access(folder, os.W_OK):
    return folder
  if sys.platform == "linux":
    try:
      os.mkdir("/sys/metadcseg_probe")
    except OSError:
      return pathlib.Path("/sys")
    os.rmdir("/sys/metadcseg_probe")
  return None


def _mistakes(tmp: pathlib.Path) -> dict[str, tuple[str, list[str], str]]:
  """Each command-line mistake: (script, arguments, the start of its one-line error)."""
  (tmp / "syntax.py").write_text("import ml_collections\n\ndef get_config(:\n  pass\n")
  (tmp / "fails.py").write_text("def get_config():\n  return undefined_name\n")
  (tmp / "a_file").write_text("x")
  (tmp / "folder").mkdir()
  unreadable = tmp / "unreadable.py"
  unreadable.write_text("def get_config():\n  return None\n")
  unreadable.chmod(0)
  read_only = _read_only_folder(tmp)
  train = "metadcseg-train"
  wd = f"--workdir={tmp / 'run'}"
  rows = {
    "relative config from another folder": (
      train,
      ["--config=experiments/configs/synthetic.py", wd],
      "error: config file experiments/configs/synthetic.py not found in "
      f"{tmp} (a relative path is read from the folder the command runs in; the commands in "
      "the README run from the repository root); the shipped synthetic.py is "
      f"{ROOT / 'experiments' / 'configs' / 'synthetic.py'}",
    ),
    "missing config": (
      train,
      [f"--config={tmp / 'nope.py'}", wd],
      f"error: config file {tmp / 'nope.py'} not found; metadcseg-train --help lists the "
      "configs that ship",
    ),
    "config is a folder": (
      train,
      [f"--config={tmp / 'folder'}", wd],
      f"error: config {tmp / 'folder'} is a folder: pass a config file (.py) in it",
    ),
    "unreadable config": (
      train,
      [f"--config={unreadable}", wd],
      f"error: cannot read config file {unreadable}: Permission denied",
    ),
    "config argument not taken": (
      train,
      [f"--config={TINY}:bad", wd],
      f"error: config file {TINY} does not take the argument 'bad' (get_config() takes 0 "
      f"positional arguments but 1 was given); pass --config={TINY}",
    ),
    "config syntax error": (
      train,
      [f"--config={tmp / 'syntax.py'}", wd],
      f"error: syntax error in config file {tmp / 'syntax.py'}, line 3: ",
    ),
    "config raises": (
      train,
      [f"--config={tmp / 'fails.py'}", wd],
      f"error: config file {tmp / 'fails.py'}, line 2 failed: NameError: name "
      "'undefined_name' is not defined",
    ),
    "workdir under a file": (
      train,
      [f"--config={TINY}", f"--workdir={tmp / 'a_file' / 'run'}"],
      f"error: cannot create workdir {tmp / 'a_file' / 'run'}: {tmp / 'a_file'} is a file, "
      "not a folder",
    ),
    "workdir in a read-only folder": (
      train,
      [f"--config={TINY}", f"--workdir={read_only}/metadcseg_run/run"],
      f"error: cannot create workdir {read_only}/metadcseg_run/run: {read_only} is ",
    ),
    "workdir is a read-only folder": (
      train,
      [f"--config={TINY}", f"--workdir={read_only}"],
      f"error: workdir {read_only} is not writable (",
    ),
    "benchmark workdir in a read-only folder": (
      "metadcseg-benchmark",
      [f"--config={TINY}", f"--workdir={read_only}/bench", "--methods=ce", "--noise=none"],
      f"error: cannot create workdir {read_only}/bench: {read_only} is ",
    ),
    "missing --workdir": (
      train,
      [f"--config={TINY}"],
      "error: --workdir is required (metadcseg-train --help lists the flags)",
    ),
    "a positional argument": (
      train,
      [f"--config={TINY}", wd, "runs/x"],
      "error: unexpected arguments runs/x: flags are written --name=value",
    ),
  }
  if os.access(unreadable, os.R_OK):  # root reads it anyway
    del rows["unreadable config"]
  if read_only is None:
    for row in [r for r in rows if "read-only" in r]:
      del rows[row]
  return rows


@pytest.fixture(scope="module")
def entry_points(tmp_path_factory):
  """Every console script's --help and every mistake of `_mistakes`, in one interpreter."""
  tmp = tmp_path_factory.mktemp("mistakes")
  rows = _mistakes(tmp)
  calls = [{"script": name, "argv": ["--help"]} for name in SCRIPTS]
  calls += [{"script": script, "argv": argv, "cwd": tmp} for script, argv, _ in rows.values()]
  results = _call_entry_points(calls)
  helps = dict(zip(SCRIPTS, results[: len(SCRIPTS)]))
  mistakes = {
    row: (result, expected)
    for (row, (_, _, expected)), result in zip(rows.items(), results[len(SCRIPTS) :])
  }
  return helps, mistakes


@pytest.mark.parametrize(
  "script, named",
  [
    ("metadcseg-train", ["--config=FILE[:ARG]", "--workdir=DIR", "--config.FIELD=VALUE"]),
    (
      "metadcseg-speed",
      ["--sizes=", "--widths=", "--methods=", "--batches=", "--[no]torch", "--trainer_steps=INT"],
    ),
    ("metadcseg-corrupt", ["--config=FILE[:ARG]", "--kinds="]),
    ("metadcseg-benchmark", ["--config=", "--workdir=DIR", "--preset=main|", "--seeds="]),
    ("metadcseg-audit", ["--workdir=DIR", "--top=INT", "--[no]recompute"]),
  ],
)
def test_help_lists_the_commands_flags_and_exits_0(entry_points, script, named):
  helps, _ = entry_points
  assert sorted(helps) == sorted(SCRIPTS)  # every console script pyproject declares
  result = helps[script]
  text = result["stdout"]
  assert result["code"] == 0 and result["stderr"] == "", result
  assert result["flags"], script
  for flag in result["flags"]:
    assert f"--{flag}=" in text or f"--[no]{flag}" in text, flag
  for form in named:
    assert f"  {form}" in text, form
  # One-line descriptions beside the flags, an example command, the shipped configs.
  assert "Flags:" in text and "--helpfull" in text
  lines = text.splitlines()
  assert any(line.startswith(f"    {script} ") or line == f"    {script}" for line in lines)
  if "--config=FILE[:ARG]" in text:
    assert "synthetic.py   The README demo: MetaDCSeg on the built-in synthetic set" in text
    assert "\n  tiny.py " in text and "\n  table8.py" not in text  # table8 is no config


@pytest.mark.parametrize("old", ["metadcseg-bench", "metadcseg-throughput"])
def test_the_old_speed_names_say_the_new_one_and_show_its_help(entry_points, old):
  helps, _ = entry_points
  result = helps[old]
  (notice,) = result["stderr"].splitlines()
  assert notice.startswith(f"{old} is now metadcseg-speed (") and "metadcseg-speed --help" in notice
  assert result["code"] == 0 and "    metadcseg-speed --sizes=" in result["stdout"]


def test_help_of_the_installed_script_exits_0():
  out = _run([_script("metadcseg-corrupt"), "--help"])
  assert out.returncode == 0 and out.stderr == "", out.stderr
  assert "  --kinds=A,B,..." in out.stdout


@pytest.mark.parametrize(
  "row",
  [
    "relative config from another folder",
    "missing config",
    "config is a folder",
    "unreadable config",
    "config argument not taken",
    "config syntax error",
    "config raises",
    "workdir under a file",
    "workdir in a read-only folder",
    "workdir is a read-only folder",
    "benchmark workdir in a read-only folder",
    "missing --workdir",
    "a positional argument",
  ],
)
def test_command_line_mistakes_are_one_line_with_status_2(entry_points, row):
  _, mistakes = entry_points
  if row not in mistakes:
    pytest.skip("no such folder for this user (root ignores permissions)")
  result, expected = mistakes[row]
  lines = [l for l in result["stderr"].splitlines() if l.strip()]
  assert result["code"] == 2 and len(lines) == 1, result
  assert lines[0].startswith(expected), lines[0]
  assert result["stdout"] == ""


def test_small_cpu_xla_default_leaves_a_users_setting_alone():
  env = {}
  assert cli.apply_cpu_defaults(env, cpus=2) and env["XLA_FLAGS"] == cli.CPU_XLA_FLAGS
  env = {"XLA_FLAGS": ""}  # set, even empty: the user's
  assert not cli.apply_cpu_defaults(env, cpus=1) and env["XLA_FLAGS"] == ""
  env = {}
  assert not cli.apply_cpu_defaults(env, cpus=16) and "XLA_FLAGS" not in env
