"""The label audit's report on a run (`metadcseg-audit`): rank its training masks by quality.

    audit_report.recompute("runs/meta")           # passes from the kept checkpoints (optional)
    r = audit_report.report("runs/meta", top=16)  # audit.csv, suspicion.npy, gallery.png

Reads the audit passes a meta method (l2b, metadcseg) wrote in its last epochs
(`metadcseg_jax.training.audit_passes`) and writes, into `out` (default `<workdir>/audit`):
`audit.csv` (every training image, most suspicious first: rank, index in the training split, case
id, score (the soft disagreement 1 − soft Dice between the mask and the model's foreground
probability, chosen on validation runs; `ranking_score`), the meta suspicion, the soft and the hard
disagreement, and where the clean masks are known because the noise was injected, 1 − Dice to the
clean mask), `suspicion.npy` ((N,H,W) float16, rows in the CSV's order) and `gallery.png` (image,
given mask, model's mask, suspicion map of the `top` most suspicious). With injected noise it also
measures how well the score finds the corrupted masks (image AUROC and AP, Spearman with 1 − Dice,
pixel AP for the flipped pixels; `measured.json`, ROC curves in `roc.png`), beside two scores
without meta-weights (the hard and the soft disagreement between the mask and the model's) and, with
cleanlab installed (the extra `audit`), cleanlab's scores on the same probabilities.
"""

import csv
import datetime
import io
import json
import pathlib
import shutil

from absl import logging
import ml_collections
import numpy as np
from scipy import stats

from metadcseg_jax import files
from metadcseg_jax import methods
from metadcseg_jax.audit import scores as audit_scores
from metadcseg_jax.data import pipeline
from metadcseg_jax.errors import WorkdirError
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import figures
from metadcseg_jax.training import runs
from metadcseg_jax.training import train

try:  # the extra `audit`
  from metadcseg_jax.audit import cleanlab_ref
except ImportError:
  cleanlab_ref = None

CORRUPTED_ABOVE = (0.1, 0.3, 0.5)


def recompute(workdir, *, meta_images: int | None = None) -> list[int]:
  """Writes an audit pass for each checkpoint the run kept, with the trainer's own jitted
  function (its passes and these agree); earlier passes are moved to `audit/replaced-<time>/`.
  `meta_images` None: the run's `config.audit.meta_images`. Returns the epochs.

  Raises:
    AuditError: the run's method has no meta-weights, or it kept no checkpoint.
  """
  workdir = pathlib.Path(workdir)
  config = runs.run_config(workdir)
  if not methods.REGISTRY[config.method].audits:
    raise audit_scores.AuditError(
      f"{workdir}: its method is {config.method!r}, which has no meta-weights to audit with "
      f"(the meta methods are l2b and metadcseg)"
    )
  run = runs.prepare(config, workdir)
  compiled = train.compiled_for(run.config, run.steps_per_epoch)
  with run.checkpointer() as ckpt:
    epochs = ckpt.epochs()
    if not epochs:
      raise audit_scores.AuditError(f"{ckpt.directory}: no checkpoint to audit from")
    _move_passes_aside(workdir)
    for epoch in epochs:
      result = audit_passes.run_pass(
        compiled.method,
        run.restore(ckpt, epoch),
        run.splits,
        run.config,
        meta_images=meta_images,
        fns=compiled.audit,
      )
      logging.info(
        "audit pass of epoch %d: %s", epoch, audit_passes.save_pass(workdir, epoch, result)
      )
  return epochs


def _move_passes_aside(workdir: pathlib.Path) -> None:
  """Moves the run's audit passes to `audit/replaced-<time>/` (nothing written is lost)."""
  folder = workdir / audit_passes.AUDIT_DIR
  old = sorted(folder.glob("epoch_*.npz"))
  if not old:
    return
  aside = folder / f"replaced-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
  aside.mkdir(parents=True)
  for path in old:
    shutil.move(str(path), aside / path.name)
  logging.info("moved %d earlier audit passes to %s", len(old), aside)


def audited(workdir) -> tuple[ml_collections.ConfigDict, dict, pipeline.Records, list[int]]:
  """A run's config, its averaged audit scores (`audit_scores.load`), its training split, and the
  position in that split of each audited image (in the scores' order).

  Raises:
    AuditError: the run has no audit passes.
    WorkdirError: not a run folder, or its data no longer holds the audited images.
  """
  workdir = pathlib.Path(workdir)
  config = runs.run_config(workdir)
  scores = audit_scores.load(workdir, method=config.method)
  run = runs.prepare(config, workdir)
  by_source = {int(s): i for i, s in enumerate(run.splits.train.indices)}
  missing = [int(i) for i in scores["index"] if int(i) not in by_source]
  if missing:
    raise WorkdirError(
      f"{workdir}: the audit scores name training examples the data no longer has "
      f"(e.g. index {missing[0]}); was the dataset changed?"
    )
  return run.config, scores, run.splits.train, [by_source[int(i)] for i in scores["index"]]


def report(workdir, *, out=None, top: int = 12, corrupted_above=CORRUPTED_ABOVE) -> dict:
  """Writes audit.csv, suspicion.npy and gallery.png, and with injected noise measured.json and
  roc.png (module docstring).

  Args:
    workdir: a finished meta run's folder (l2b, metadcseg) with its audit passes.
    out: the folder the outputs go to (None: `<workdir>/audit`).
    top: the most suspicious masks shown in the gallery.
    corrupted_above: the thresholds t of 1 − Dice to the clean mask above which a mask counts
      as corrupted in the measurements.

  Returns:
    {"out": the folder, "epochs": the audited epochs, "meta_images" (as in `audit_scores.load`),
     "n": the training masks ranked, "measured": `measure`'s figures, or {} without injected
     noise}.
  """
  workdir = pathlib.Path(workdir)
  config, scores, train_split, positions = audited(workdir)
  scores, positions, n_trusted = _without_trusted(workdir, scores, train_split, positions)
  out = pathlib.Path(out) if out else workdir / audit_passes.AUDIT_DIR
  out.mkdir(parents=True, exist_ok=True)
  examples = [train_split[k] for k in positions]
  noisy = np.stack([e["noisy_label"] for e in examples])
  clean = np.stack([e["label"] for e in examples])
  injected = config.data.noise.kind != "none"
  corruption = audit_scores.dice_distance(noisy, clean) if injected else None
  ranking, ranked_by = ranking_score(scores, noisy)
  order = np.argsort(-ranking, kind="stable")
  case_ids = [train_split.case_id(k) for k in positions]
  _write_ranking(out, scores, ranking, noisy, corruption, case_ids, order)
  shown = order[:top]
  figures.write_audit_gallery(
    out / "gallery.png",
    images=np.stack([examples[k]["image"] for k in shown]),
    given=noisy[shown],
    model=scores["pseudo"][shown],
    suspicion=scores["suspicion"][shown],
    titles=[
      f"#{r + 1} idx {int(scores['index'][k])} score {ranking[k]:.3f}" for r, k in enumerate(shown)
    ],
  )
  measured = {}
  if injected:
    thresholds = [float(t) for t in corrupted_above]
    measured, curves = measure(scores, noisy, clean, thresholds)
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
    "n_trusted_left_out": n_trusted,
    "injected": injected,
    "ranked_by": ranked_by,
    "measured": measured,
  }


def _without_trusted(workdir: pathlib.Path, scores: dict, train_split, positions: list[int]):
  """The audit without the training images whose masks are trusted (a user's folder): they
  trained on verified masks, there is nothing to rank. Returns (scores, positions, how many
  were left out)."""
  try:
    info = json.loads((workdir / runs.DATA_INFO).read_text())
  except (OSError, ValueError):
    return scores, positions, 0
  trusted = set((info.get("split") or {}).get("trusted") or ())
  keep = np.array([train_split.case_id(k) not in trusted for k in positions], bool)
  if keep.all():
    return scores, positions, 0
  n = len(positions)
  kept = {
    k: (v[keep] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in scores.items()
  }
  return kept, [k for k, m in zip(positions, keep) if m], int((~keep).sum())


def ranking_score(scores: dict, noisy: np.ndarray) -> tuple[np.ndarray, str]:
  """(N,) the score audit.csv is sorted by, and its name.

  The soft disagreement 1 − soft Dice(y, p) between the given mask y (N,H,W) and the model's
  foreground probability, where the passes stored the probabilities; the meta suspicion
  otherwise. Chosen on the runs and with the criterion of `experiments/audit_select.py`
  (BUILD_NOTES.md, "Label audit: the score chosen on validation, the test runs").
  """
  if "probs" in scores:
    return audit_scores.soft_dice_distance(noisy, scores["probs"]), "soft disagreement"
  return np.asarray(scores["score"]), "meta suspicion"


def _write_ranking(out, scores, ranking, noisy, corruption, case_ids, order) -> None:
  """audit.csv and suspicion.npy, rows in `order` (most suspicious first): the ranking score,
  then the meta suspicion, the soft (where the probabilities were stored) and the hard
  disagreement as columns; the corruption column only where it is known (`corruption` (N,)
  not None)."""
  columns = {"meta_suspicion": np.asarray(scores["score"])}
  if "probs" in scores:  # then `ranking` is the soft disagreement (`ranking_score`)
    columns["soft_disagreement"] = ranking
  columns["disagreement"] = audit_scores.dice_distance(noisy, scores["pseudo"])
  if corruption is not None:
    columns["corruption"] = corruption
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["rank", "index", "case_id", "score", *columns])
  for rank, k in enumerate(order, 1):
    row = [rank, int(scores["index"][k]), case_ids[k], f"{ranking[k]:.5f}"]
    w.writerow(row + [f"{v[k]:.5f}" for v in columns.values()])
  files.write_atomic(out / "audit.csv", buf.getvalue())
  np.save(out / "suspicion.npy", scores["suspicion"][order].astype(np.float16))


def measure(
  scores: dict, noisy: np.ndarray, clean: np.ndarray, thresholds: list[float]
) -> tuple[dict, dict]:
  """How well each score finds the corrupted masks, where the clean masks are known.

  A mask (N,H,W) is corrupted at t when 1 − Dice to its clean mask exceeds t. Scores: the
  audit's, the hard and the soft disagreement with the model, and cleanlab's if installed.

  Args:
    scores: `audited`'s averaged audit scores ("score", "suspicion", "pseudo", "probs").
    noisy: (N,H,W) the training masks as given.
    clean: (N,H,W) their clean masks (known where the noise was injected).
    thresholds: the values of t.

  Returns:
    ({score name: {"image_auroc", "image_ap": {t: value}, "spearman", "pixel_ap"},
      "corrupted_share": {t: share}}, {t: {score name: (fpr, tpr, auroc)}} for `roc.png`).
  """
  corruption = audit_scores.dice_distance(noisy, clean)
  flipped = noisy != clean
  measured, curves = {}, {t: {} for t in thresholds}

  def add(name, image_score, pixel_score):
    auroc = {t: audit_scores.auroc(image_score, corruption > t) for t in thresholds}
    for t in thresholds:
      curves[t][name] = (*audit_scores.roc_curve(image_score, corruption > t), auroc[t])
    measured[name] = {
      "image_auroc": auroc,
      "image_ap": {
        t: audit_scores.average_precision(image_score, corruption > t) for t in thresholds
      },
      "spearman": float(stats.spearmanr(image_score, corruption).statistic),
      "pixel_ap": audit_scores.average_precision(pixel_score, flipped),
    }

  add("meta suspicion", scores["score"], scores["suspicion"])
  add(
    "disagreement 1 - Dice(y, model)",
    audit_scores.dice_distance(noisy, scores["pseudo"]),
    (noisy != scores["pseudo"]).astype(np.float32),
  )
  if "probs" in scores:
    add(
      "soft disagreement 1 - soft Dice(y, model)",
      audit_scores.soft_dice_distance(noisy, scores["probs"]),
      np.abs((noisy > 0) - (1.0 - scores["probs"][..., 0])),
    )
  if cleanlab_ref is not None and "probs" in scores:
    cl = cleanlab_ref.suspicion(noisy, scores["probs"])
    name = f"cleanlab {cleanlab_ref.VERSION}"
    add(f"{name} get_label_quality_scores", cl["image"], cl["pixel"])
    add(
      f"{name} find_label_issues (share per image)",
      cl["issues"].mean(axis=(1, 2)),
      cl["issues"].astype(np.float32),
    )
  measured["corrupted_share"] = {t: float((corruption > t).mean()) for t in thresholds}
  return measured, curves


def summary_lines(r: dict) -> list[str]:
  """What `metadcseg-audit` prints of `report`'s result: where the files are and, with
  injected noise, a Markdown table of the measured figures (one row per score)."""
  lines = [
    f"audited {r['n']} training masks (passes of epochs {r['epochs']}, meta images "
    f"{r['meta_images'] or 'as in training'}): "
    f"{r['out']}/audit.csv, gallery.png" + (", measured.json, roc.png" if r["measured"] else "")
  ]
  if r.get("n_trusted_left_out"):
    lines.append(f"{r['n_trusted_left_out']} training masks are trusted: not ranked")
  if not r.get("injected", True):
    lines.append(
      "no noise was injected, so no mask is known to be wrong: the ranking (audit.csv, "
      "gallery.png) is not measured against anything"
    )
  measured = r["measured"]
  if not measured:
    return lines
  shares = measured["corrupted_share"]
  lines.append(
    "| score | "
    + " | ".join(f"AUROC / AP, 1-Dice > {t:g} ({shares[t]:.0%})" for t in shares)
    + " | Spearman | pixel AP |"
  )
  lines.append("|---|" + "---|" * (len(shares) + 2))
  for name, m in measured.items():
    if name == "corrupted_share":
      continue
    cells = [f"{m['image_auroc'][t]:.3f} / {m['image_ap'][t]:.3f}" for t in shares]
    lines.append(
      f"| {name} | " + " | ".join(cells) + f" | {m['spearman']:.3f} | {m['pixel_ap']:.3f} |"
    )
  return lines
