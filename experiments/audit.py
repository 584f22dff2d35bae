r"""`metadcseg-audit --workdir=RUN`: rank a finished run's training masks by label quality.

    metadcseg-train --config=experiments/configs/synthetic.py --workdir=runs/meta
    metadcseg-audit --workdir=runs/meta --top=16

Reads the audit passes a meta method (l2b, metadcseg) wrote in its last epochs
(`metadcseg_jax/audit.py`) and writes, into --out (default `<workdir>/audit`):
`audit.csv` (every training image, most suspicious first: rank, index in the training split,
case id, score, 1 − Dice between the mask and the model's, and where the clean masks are known
because the noise was injected, 1 − Dice to the clean mask), `suspicion.npy` ((N,H,W) float16,
rows in the CSV's order) and `gallery.png` (image, given mask, model's mask, suspicion map of
the --top most suspicious). With injected noise it also prints how well the score finds the
corrupted masks (image AUROC and AP, Spearman with 1 − Dice, pixel AP for the flipped pixels;
`measured.json`, ROC curves in `roc.png`), beside two scores without meta-weights (the hard
and the soft disagreement between the mask and the model's) and, with cleanlab installed
(`pip install -e '.[audit]'`), cleanlab's scores on the same probabilities.

`--recompute` first writes the audit passes from the run's kept checkpoints: for a run trained
with config.audit.epochs=0, or with another `--meta_images` (earlier passes are kept aside).
"""

import csv
import datetime
import io
import json
import pathlib
import shutil

from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from scipy import stats

from metadcseg_jax import audit
from metadcseg_jax import checkpoint
from metadcseg_jax import cli
from metadcseg_jax import figures
from metadcseg_jax import files
from metadcseg_jax import methods
from metadcseg_jax import workdir as workdir_lib
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import WorkdirError

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined when run, so importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "A finished (or interrupted) run's folder.")
  flags.DEFINE_string("out", None, "Where to write the report (default: <workdir>/audit).")
  flags.DEFINE_integer("top", 12, "Images in the gallery.")
  flags.DEFINE_list(
    "corrupted_above",
    ["0.1", "0.3", "0.5"],
    "With injected noise: a mask is 'corrupted' when 1 − Dice to the clean mask exceeds this "
    "(the image AUROC and AP at each).",
  )
  flags.DEFINE_bool(
    "recompute",
    False,
    "First (re)compute the audit passes from the run's kept checkpoints: for a run trained "
    "with config.audit.epochs=0, or to change --meta_images. Earlier passes are moved to "
    "audit/replaced-<time>/.",
  )
  flags.DEFINE_integer(
    "meta_images",
    None,
    "With --recompute: clean meta images per audit batch (0: the training step's meta "
    "batches; default: the run's config.audit.meta_images).",
  )
  flags.mark_flags_as_required(["workdir"])


def _run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  settings = workdir_lib.Workdir(workdir).first_config()
  if settings is None:
    raise WorkdirError(f"{workdir}: no config.json, not a metadcseg-train run folder")
  return ml_collections.ConfigDict(settings)


def recompute(workdir, *, meta_images: int | None = None) -> list[int]:
  """Writes an audit pass for each checkpoint the run kept; returns their epochs.

  Raises:
    AuditError: the run's method has no meta-weights, or it kept no checkpoint.
  """
  workdir = pathlib.Path(workdir)
  config = _run_config(workdir)
  t = config.train
  if not methods.REGISTRY[config.method].audits:
    raise audit.AuditError(
      f"{workdir}: its method is {config.method!r}, which has no meta-weights to audit with "
      f"(the meta methods are l2b and metadcseg)"
    )
  splits = pipeline.prepare_data(config.data, meta_batch_size=t.meta_batch_size)
  config, _ = methods.with_data_settings(config, splits.info)
  method = methods.create(config, steps_per_epoch=len(splits.train) // t.batch_size)
  abstract = jax.eval_shape(lambda: method.init_state(jax.random.PRNGKey(config.seed)))
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, config=config)
  try:
    epochs = ckpt.epochs()
    if not epochs:
      raise audit.AuditError(f"{workdir / 'checkpoints'}: no checkpoint to audit from")
    if meta_images is None:
      meta_images = config.get("audit", {}).get("meta_images", 0)
    previous = workdir / audit.AUDIT_DIR
    old = sorted(previous.glob("epoch_*.npz"))
    if old:
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      aside = previous / f"replaced-{stamp}"
      aside.mkdir(parents=True)
      for path in old:
        shutil.move(str(path), aside / path.name)
      logging.info("moved %d earlier audit passes to %s", len(old), aside)
    # As the trainer compiles it (its passes and these must agree).
    fn = jax.jit(method.audit_maps, compiler_options=methods.base.RUN_ONCE_COMPILE)
    for epoch in epochs:
      state = ckpt.restore_state(epoch, abstract, fallback_settings=config.to_dict())
      result = audit.audit_pass(
        method,
        state,
        splits.train,
        splits.meta,
        batch_size=t.batch_size,
        meta_batch_size=t.meta_batch_size,
        meta_images=meta_images,
        audit_fn=fn,
      )
      logging.info("audit pass of epoch %d: %s", epoch, audit.save_pass(workdir, epoch, result))
  finally:
    ckpt.close()
  return epochs


def audited(workdir) -> tuple[ml_collections.ConfigDict, dict, pipeline.Records, list[int]]:
  """A run's config, its averaged audit scores (`audit.load`), its training split, and the
  position in that split of each audited image (in the scores' order).

  Raises:
    AuditError: the run has no audit passes.
    WorkdirError: not a run folder, or its data no longer holds the audited images.
  """
  workdir = pathlib.Path(workdir)
  config = _run_config(workdir)
  scores = audit.load(workdir, method=config.get("method"))
  splits = pipeline.prepare_data(config.data, meta_batch_size=config.train.meta_batch_size)
  by_source = {int(s): i for i, s in enumerate(splits.train.indices)}
  missing = [int(i) for i in scores["index"] if int(i) not in by_source]
  if missing:
    raise WorkdirError(
      f"{workdir}: the audit scores name training examples the data no longer has "
      f"(e.g. index {missing[0]}); was the dataset changed?"
    )
  return config, scores, splits.train, [by_source[int(i)] for i in scores["index"]]


def report(workdir, *, out=None, top: int = 12, corrupted_above=(0.1, 0.3, 0.5)) -> dict:
  """Writes audit.csv, suspicion.npy and gallery.png, and with injected noise measured.json and
  roc.png; returns the measured figures (or {})."""
  workdir = pathlib.Path(workdir)
  config, scores, train, positions = audited(workdir)
  out = pathlib.Path(out) if out else workdir / audit.AUDIT_DIR
  out.mkdir(parents=True, exist_ok=True)
  examples = [train[k] for k in positions]
  noisy = np.stack([e["noisy_label"] for e in examples])
  clean = np.stack([e["label"] for e in examples])
  injected = config.data.noise.kind != "none"
  disagreement = audit.dice_distance(noisy, scores["pseudo"])
  corruption = audit.dice_distance(noisy, clean) if injected else None
  order = np.argsort(-scores["score"], kind="stable")

  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(
    ["rank", "index", "case_id", "score", "disagreement"] + (["corruption"] if injected else [])
  )
  for rank, k in enumerate(order, 1):
    row = [rank, int(scores["index"][k]), train.case_id(positions[k])]
    row += [f"{scores['score'][k]:.5f}", f"{disagreement[k]:.4f}"]
    w.writerow(row + ([f"{corruption[k]:.4f}"] if injected else []))
  files.write_atomic(out / "audit.csv", buf.getvalue())
  np.save(out / "suspicion.npy", scores["suspicion"][order].astype(np.float16))
  shown = order[:top]
  figures.write_audit_gallery(
    out / "gallery.png",
    images=np.stack([examples[k]["image"] for k in shown]),
    given=noisy[shown],
    model=scores["pseudo"][shown],
    suspicion=scores["suspicion"][shown],
    titles=[
      f"#{r + 1} idx {int(scores['index'][k])} score {scores['score'][k]:.3f}"
      for r, k in enumerate(shown)
    ],
  )
  measured = {}
  if injected:
    flipped = noisy != clean
    thresholds = [float(t) for t in corrupted_above]

    curves = {t: {} for t in thresholds}

    def measure(name, image_score, pixel_score):
      auroc = {t: audit.auroc(image_score, corruption > t) for t in thresholds}
      for t in thresholds:
        curves[t][name] = (*audit.roc_curve(image_score, corruption > t), auroc[t])
      measured[name] = {
        "image_auroc": auroc,
        "image_ap": {t: audit.average_precision(image_score, corruption > t) for t in thresholds},
        "spearman": float(stats.spearmanr(image_score, corruption).statistic),
        "pixel_ap": audit.average_precision(pixel_score, flipped),
      }

    measure("meta suspicion", scores["score"], scores["suspicion"])
    measure(
      "disagreement 1 - Dice(y, model)",
      disagreement,
      (noisy != scores["pseudo"]).astype(np.float32),
    )
    if "probs" in scores:
      measure(
        "soft disagreement 1 - soft Dice(y, model)",
        audit.soft_dice_distance(noisy, scores["probs"]),
        np.abs((noisy > 0) - (1.0 - scores["probs"][..., 0])),
      )
    try:
      from experiments import cleanlab_ref  # pylint: disable=g-import-not-at-top  (optional)
    except ImportError:
      cleanlab_ref = None
    if cleanlab_ref is not None and "probs" in scores:
      cl = cleanlab_ref.suspicion(noisy, scores["probs"])
      name = f"cleanlab {cleanlab_ref.VERSION}"
      measure(f"{name} get_label_quality_scores", cl["image"], cl["pixel"])
      measure(
        f"{name} find_label_issues (share per image)",
        cl["issues"].mean(axis=(1, 2)),
        cl["issues"].astype(np.float32),
      )
    measured["corrupted_share"] = {t: float((corruption > t).mean()) for t in thresholds}
    files.write_atomic(out / "measured.json", json.dumps(measured, indent=1))
    figures.write_audit_roc(
      out / "roc.png",
      curves,
      title=f"{workdir.name}: {len(order)} training masks, noise {config.data.noise.kind}",
    )
  return {
    "out": str(out),
    "epochs": scores["epochs"],
    "meta_images": scores["meta_images"],
    "n": len(order),
    "measured": measured,
  }


def main(argv):
  del argv
  if FLAGS.recompute:
    recompute(FLAGS.workdir, meta_images=FLAGS.meta_images)
  r = report(FLAGS.workdir, out=FLAGS.out, top=FLAGS.top, corrupted_above=FLAGS.corrupted_above)
  print(
    f"audited {r['n']} training masks (passes of epochs {r['epochs']}, meta images "
    f"{r['meta_images'] or 'as in training'}): "
    f"{r['out']}/audit.csv, gallery.png" + (", measured.json, roc.png" if r["measured"] else "")
  )
  measured = r["measured"]
  if measured:
    shares = measured["corrupted_share"]
    print(
      "| score | "
      + " | ".join(f"AUROC / AP, 1-Dice > {t:g} ({shares[t]:.0%})" for t in shares)
      + " | Spearman | pixel AP |"
    )
    print("|---|" + "---|" * (len(shares) + 2))
    for name, m in measured.items():
      if name == "corrupted_share":
        continue
      cells = [f"{m['image_auroc'][t]:.3f} / {m['image_ap'][t]:.3f}" for t in shares]
      print(f"| {name} | " + " | ".join(cells) + f" | {m['spearman']:.3f} | {m['pixel_ap']:.3f} |")


def run():
  """Console-script entry (pyproject `metadcseg-audit`)."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
