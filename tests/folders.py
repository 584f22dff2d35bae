"""Users' folders built on the fly for the tests: 2D images with trusted masks, and volumes
in the Decathlon layout."""

import json

import nibabel as nib
import numpy as np
from PIL import Image

from experiments.configs import tiny

SIZE = 32


def disc(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def write_folder(root, n=24, trusted=(), *, shift=4, seed=0, sizes=None):
  """images/, masks/ (the user's masks: each disc shifted by `shift` px) and, for `trusted`
  indices, trusted/ (the true discs). `sizes` maps an index to its (height, width) (default
  SIZE x SIZE). Returns {stem: (true mask, given mask)}."""
  rng = np.random.default_rng(seed)
  for sub in ("images", "masks") + (("trusted",) if trusted else ()):
    (root / sub).mkdir(parents=True, exist_ok=True)
  truth = {}
  for i in range(n):
    stem = f"case{i:02d}"
    h, w = (sizes or {}).get(i, (SIZE, SIZE))
    cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 8)
    true = disc(h, w, cy * h // SIZE, cx * w // SIZE, r)
    given = disc(h, w, cy * h // SIZE, cx * w // SIZE + shift, r)
    image = (true * 120 + rng.integers(0, 80, (h, w))).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(given * 255).save(root / "masks" / f"{stem}.png")
    if i in trusted:
      Image.fromarray(true * 255).save(root / "trusted" / f"{stem}.png")
    truth[stem] = (true, given)
  return truth


def folder_config(root, data_dir, **data):
  config = tiny.get_config()
  config.method = "ce"
  config.data.name = "folder"
  config.data.manual_dir = str(root)
  config.data.data_dir = str(data_dir)
  config.data.size = SIZE
  config.data.noise.kind = "none"
  config.data.noise.calibrate = False
  config.data.update(data)
  return config


CLASSES = ("background", "edema", "core")
# Non-square slices and anisotropic voxels with a non-identity affine: a swapped axis or
# spacing shows in every figure measured on them.
VOLUME_SHAPE = (16, 12, 4)  # (X, Y, Z): slices of 12 rows x 16 columns
ZOOMS = (0.7, 0.9, 2.5)


def _labels(rng, shape):
  lab = np.zeros(shape, np.uint8)
  cx, cy = rng.integers(5, 11), rng.integers(4, 8)
  for z in range(shape[2]):
    lab[..., z] = disc(shape[0], shape[1], cx, cy, 4 + (z % 2))
    lab[..., z] += disc(shape[0], shape[1], cx, cy, 2)
  return lab


def write_decathlon(root, n=5, shape=VOLUME_SHAPE, seed=0, *, v2=False, trusted=()):
  """A Decathlon-layout folder of n tiny NIfTI volumes with three classes, voxels of ZOOMS mm
  and a translated affine. `v2`: nnU-Net's layout (dataset.json's "channel_names" and
  {"name": value} labels, two channel files `<case>_0000` / `_0001` per case, the second the
  brighter one). `trusted`: the indices whose true labels go to trusted/ (labelsTr/ then holds
  them with the core class dropped). Returns ({case: true labels (X,Y,Z)}, affine)."""
  rng = np.random.default_rng(seed)
  for sub in ("imagesTr", "labelsTr") + (("trusted",) if trusted else ()):
    (root / sub).mkdir(parents=True, exist_ok=True)
  affine = np.diag([*ZOOMS, 1.0])
  affine[:3, 3] = (-10.0, 4.0, 30.0)
  labels = {}
  for i in range(n):
    case = f"vol_{i:03d}"
    lab = _labels(rng, shape)
    image = lab * 50.0 + rng.normal(100, 10, shape)
    if v2:
      for c, scale in ((0, 1.0), (1, 3.0)):
        nib.save(
          nib.Nifti1Image((scale * image).astype(np.float32), affine),
          root / "imagesTr" / f"{case}_{c:04d}.nii.gz",
        )
    else:
      nib.save(
        nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{case}.nii.gz"
      )
    given = np.where(lab == 2, 1, lab).astype(np.uint8) if i in trusted else lab
    nib.save(nib.Nifti1Image(given, affine), root / "labelsTr" / f"{case}.nii.gz")
    if i in trusted:
      nib.save(nib.Nifti1Image(lab, affine), root / "trusted" / f"{case}.nii.gz")
    labels[case] = lab
  if v2:
    info = {
      "channel_names": {"0": "T1", "1": "T2"},
      "labels": {name: k for k, name in enumerate(CLASSES)},
      "file_ending": ".nii.gz",
      "numTraining": n,
    }
  else:
    info = {
      "name": "Tiny",
      "modality": {"0": "MRI"},
      "labels": {str(k): v for k, v in enumerate(CLASSES)},
      "training": [
        {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in labels
      ],
    }
  (root / "dataset.json").write_text(json.dumps(info))
  return labels, affine
