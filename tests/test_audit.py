"""The label audit: suspicion and scores by hand, the ranking on a toy set with flipped masks
(the real meta step on a per-pixel linear model), ROC/AP against hand-worked values."""

import csv

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from experiments.configs import tiny
from metadcseg_jax.audit import report as audit_report
from metadcseg_jax.audit import scores as audit_scores
from metadcseg_jax.core import meta
from metadcseg_jax.core import optim
from metadcseg_jax.data import pipeline
from metadcseg_jax.training import audit_passes
from metadcseg_jax.training import workdir as workdir_lib


def test_suspicion_is_the_pseudo_label_share_where_labels_disagree():
  y = np.array([[1, 1, 0, 0]])
  y_pseudo = np.array([[1, 0, 1, 0]])
  a = np.array([[0.3, 0.0, 0.1, 0.0]])
  b = np.array([[0.1, 0.0, 0.3, 0.2]])
  s = meta.suspicion_map(y, y_pseudo, a_tilde=a, b_tilde=b)
  # agree -> 0; disagree with γ = 0 -> 1/2; disagree -> b / (a + b) = 0.75
  np.testing.assert_allclose(s, [[0.0, 0.5, 0.75, 0.0]])
  # (0.5 + 0.75) / (|y| 2 + |ŷ| 2)
  np.testing.assert_allclose(audit_passes.image_scores(s, y, y_pseudo), [1.25 / 4])
  np.testing.assert_allclose(audit_scores.dice_distance(y, y_pseudo), [0.5])
  # p = 1 − p(background) = [0.9, 0.4, 0.5, 0]: Σ|y − p| = 0.1 + 0.6 + 0.5 = 1.2 over 2 + 1.8
  probs = np.array([[[0.1, 0.9], [0.6, 0.4], [0.5, 0.5], [1.0, 0.0]]])
  np.testing.assert_allclose(audit_scores.soft_dice_distance(y, probs), [1.2 / 3.8])


def test_auroc_and_average_precision_hand_worked():
  scores = np.array([0.1, 0.4, 0.35, 0.8])
  positive = np.array([0, 0, 1, 1])
  # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > both) -> 3/4
  assert audit_scores.auroc(scores, positive) == pytest.approx(0.75)
  # ranked 0.8 (hit, P 1), 0.4, 0.35 (hit, P 2/3) -> (1 + 2/3) / 2
  assert audit_scores.average_precision(scores, positive) == pytest.approx(5 / 6)
  assert audit_scores.auroc(np.array([0.2, 0.2]), np.array([1, 0])) == pytest.approx(0.5)
  assert np.isnan(audit_scores.auroc(scores, np.zeros(4)))
  # The curve: thresholds 0.8, 0.4, 0.35, 0.1 -> (0, 1/2), (1/2, 1/2), (1/2, 1), (1, 1).
  fpr, tpr = audit_scores.roc_curve(scores, positive)
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


def test_roc_curve_area_is_the_rank_auroc_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, 200).astype(float)  # many ties
  positive = rng.random(200) < scores / 8
  fpr, tpr = audit_scores.roc_curve(scores, positive)
  assert len(fpr) == len(np.unique(scores)) + 1
  area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
  assert area == pytest.approx(audit_scores.auroc(scores, positive), abs=1e-12)


class PixelLinear(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    del train
    return nn.Conv(2, (1, 1))(x), x


class ToySource:
  """12 images of ±1 by a clean mask (a square of varying size); masks 3, 7 and 10 flipped."""

  flipped = (3, 7, 10)

  def __init__(self):
    rng = np.random.default_rng(0)
    self.items = []
    for i in range(12):
      clean = np.zeros((8, 8), np.int32)
      clean[1 : 3 + i % 5, 2 : 4 + i % 4] = 1
      image = (2.0 * clean - 1.0 + 0.1 * rng.standard_normal((8, 8)))[..., None]
      noisy = 1 - clean if i in self.flipped else clean
      self.items.append(
        {
          "image": image.astype(np.float32),
          "label": clean,
          "noisy_label": noisy,
          "index": np.int64(i),
        }
      )

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


class ToyMethod:
  """The meta step's weights for a per-pixel linear model that already predicts the clean
  masks: the clean meta batch should move the weight of flipped pixels to the pseudo-label."""

  example_transform = None

  def __init__(self):
    self.model = PixelLinear()
    self.optimizer = optim.make_optimizer(name="sgd", learning_rate=0.1, weight_decay=0.0)

  def init(self):
    params = self.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    params = {"Conv_0": {"kernel": jnp.array([[[[-2.0, 2.0]]]]), "bias": jnp.zeros(2)}}
    return {"params": params, "opt_state": self.optimizer.tx.init(params)}

  def audit_maps(self, state, batch):
    mo = meta.meta_weights(
      self.model.apply,
      {"params": state["params"]},
      optimizer=self.optimizer,
      opt_state=state["opt_state"],
      x=batch["image"],
      y=batch["noisy_label"],
      xv=batch["meta_image"],
      yv=batch["meta_label"],
      options=meta.MetaOptions(route="reverse"),
    )
    return self._maps(batch["noisy_label"], mo)

  # The pass computes each meta batch's part once (route "jvp" at (0, 0)).
  audit_shares_direction = True

  def audit_direction(self, state, meta_image, meta_label):
    return meta.meta_direction(
      self.model.apply,
      {"params": state["params"]},
      optimizer=self.optimizer,
      opt_state=state["opt_state"],
      xv=meta_image,
      yv=meta_label,
    )

  def audit_maps_along(self, state, batch, direction):
    mo = meta.meta_weights_along(
      self.model.apply,
      {"params": state["params"]},
      x=batch["image"],
      y=batch["noisy_label"],
      direction=direction,
    )
    return self._maps(batch["noisy_label"], mo)

  @staticmethod
  def _maps(y, mo):
    return {
      "suspicion": meta.suspicion_map(y, mo.y_pseudo, a_tilde=mo.a_tilde, b_tilde=mo.b_tilde),
      "pseudo": mo.y_pseudo,
      "probs": jax.nn.softmax(mo.logits, axis=-1),
    }


def test_flipped_masks_rank_first_and_passes_average(tmp_path):
  source = ToySource()
  m = ToyMethod()
  meta_source = ToySource()
  meta_source.items = [dict(e, noisy_label=e["label"]) for e in meta_source.items[:4]]
  result = audit_passes.audit_pass(
    m, m.init(), source, meta_source, batch_size=5, meta_batch_size=2
  )
  assert result["suspicion"].shape == (12, 8, 8) and result["index"].tolist() == list(range(12))
  # Each meta batch's direction, reused over the training batches it meets, gives the maps of
  # the whole meta step (the reverse route) on every batch; the two meta batches differ.
  whole = audit_passes.audit_pass(
    m,
    m.init(),
    source,
    meta_source,
    batch_size=5,
    meta_batch_size=2,
    fns=audit_passes.Functions(jax.jit(m.audit_maps)),
  )
  for key in ("suspicion", "probs", "score"):
    np.testing.assert_allclose(
      result[key].astype(np.float32), whole[key].astype(np.float32), rtol=2e-3, atol=1e-3
    )
  np.testing.assert_array_equal(result["pseudo"], whole["pseudo"])
  assert result["probs"].shape == (12, 8, 8, 2)
  np.testing.assert_array_equal(np.argmax(result["probs"], -1), result["pseudo"])
  ranked = result["index"][np.argsort(-result["score"], kind="stable")]
  assert sorted(ranked[:3].tolist()) == list(ToySource.flipped)
  flipped = np.isin(result["index"], ToySource.flipped)
  assert result["score"][flipped].min() > 0.4 and result["score"][~flipped].max() < 0.05
  # The model's mask is the clean one, and the suspicion finds the flipped pixels.
  noisy = np.stack([e["noisy_label"] for e in source.items])
  clean = np.stack([e["label"] for e in source.items])
  np.testing.assert_array_equal(result["pseudo"], clean)
  assert (
    audit_scores.average_precision(result["suspicion"].astype(np.float32), noisy != clean) > 0.95
  )
  # Passes of two epochs are averaged; a workdir without any is a clear error.
  audit_passes.save_pass(tmp_path, 1, result)
  audit_passes.save_pass(tmp_path, 2, dict(result, score=result["score"] * 0.5))
  loaded = audit_scores.load(tmp_path)
  assert loaded["epochs"] == [1, 2]
  np.testing.assert_allclose(loaded["score"], 0.75 * result["score"], rtol=1e-6)
  with pytest.raises(audit_scores.AuditError, match=r"no meta scores \(its method is 'ce'"):
    audit_scores.load(tmp_path / "elsewhere", method="ce")
  # The whole meta set as every batch's meta batch: the same verdicts here, and recorded, so
  # passes made with different meta sets are not averaged together.
  whole = audit_passes.audit_pass(
    m, m.init(), source, meta_source, batch_size=5, meta_batch_size=2, meta_images=32
  )
  assert int(whole["meta_images"]) == 4 and int(result["meta_images"]) == 0
  ranked = whole["index"][np.argsort(-whole["score"], kind="stable")]
  assert sorted(ranked[:3].tolist()) == list(ToySource.flipped)
  audit_passes.save_pass(tmp_path, 3, whole)
  with pytest.raises(
    audit_scores.AuditError, match=r"different meta sets \(meta_images \[0, 4\]\)"
  ):
    audit_scores.load(tmp_path)


def test_report_on_a_users_folder_without_injected_noise(tmp_path):
  """The report reads any dataset the loaders read: case ids are the folder's file names, and
  without injected noise nothing is measured (no clean masks to measure against)."""
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    (tmp_path / "raw" / sub).mkdir(parents=True)
  for i in range(12):
    mask = np.zeros((32, 32), np.uint8)
    mask[4 + i : 14 + i, 6:20] = 255
    image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "raw" / "images" / f"patient{i:02d}.png")
    Image.fromarray(mask).save(tmp_path / "raw" / "masks" / f"patient{i:02d}.png")
  config = tiny.get_config()
  config.data.name, config.data.manual_dir = "folder", str(tmp_path / "raw")
  config.data.data_dir, config.data.noise.kind = str(tmp_path / "data"), "none"
  run = tmp_path / "run"
  run.mkdir()
  workdir_lib.Workdir(run).record_config(config)
  with pytest.raises(audit_scores.AuditError, match="no meta scores"):
    audit_report.report(run)
  train = pipeline.prepare_data(config.data, meta_batch_size=config.train.meta_batch_size).train
  given = np.stack([train[k]["noisy_label"] for k in range(len(train))])
  pseudo = given.copy()
  pseudo[2] = 1 - pseudo[2]  # the model disagrees with one mask everywhere
  suspicion = np.where(given != pseudo, 0.9, 0.0).astype(np.float16)
  passes = {
    "index": np.asarray(train.indices),
    "suspicion": suspicion,
    "pseudo": pseudo.astype(np.uint8),
    "score": audit_passes.image_scores(suspicion.astype(np.float32), given, pseudo),
    "meta_images": np.asarray(0),
  }
  audit_passes.save_pass(run, 7, passes)
  r = audit_report.report(run, top=2)
  rows = list(csv.DictReader((run / "audit" / "audit.csv").open()))
  assert r["measured"] == {} and "corruption" not in rows[0]
  assert rows[0]["case_id"] == train.case_id(2) and rows[0]["case_id"].startswith("patient")
  assert sorted(row["case_id"] for row in rows) == sorted(
    train.case_id(k) for k in range(len(train))
  )
  assert (run / "audit" / "gallery.png").is_file() and not (run / "audit" / "roc.png").exists()


def test_audit_csv_is_ranked_by_the_soft_disagreement_where_probabilities_were_kept():
  given = np.zeros((3, 4, 4), np.int32)
  given[:, :2] = 1  # 8 foreground pixels each
  fg = np.array([0.9, 0.2, 0.6])[:, None, None] * np.ones((3, 4, 4))  # model's p(foreground)
  probs = np.stack([1 - fg, fg], -1).astype(np.float32)
  scores = {"score": np.array([0.9, 0.1, 0.5]), "probs": probs}
  ranking, name = audit_report.ranking_score(scores, given)
  # Σ|y − p| / (|y| + Σp) by hand: 8(1 − f) + 8f over 8 + 16f.
  want = [(8 * (1 - f) + 8 * f) / (8 + 16 * f) for f in (0.9, 0.2, 0.6)]
  assert name == "soft disagreement"
  np.testing.assert_allclose(ranking, want, rtol=1e-6)
  ranking, name = audit_report.ranking_score({"score": scores["score"]}, given)
  assert name == "meta suspicion" and list(ranking) == [0.9, 0.1, 0.5]
