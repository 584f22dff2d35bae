"""Checkpoints that degrade gracefully: a damaged newest one falls back, a misfit one is named."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metadcseg_jax.errors import CheckpointError
from metadcseg_jax.training import checkpoint


def _config(width=4):
  return ml_collections.ConfigDict(
    {"model": {"width": width, "name": "unet++"}, "train": {"lr": 0.05}}
  )


def _state(width=4, value=0.0):
  return {"params": {"kernel": jnp.full((3, 3, 1, width), value)}, "step": jnp.int32(value)}


def _write(directory, epochs=(1, 2), width=4):
  ckpt = checkpoint.Checkpointer(directory, keep=3, config=_config(width))
  for epoch in epochs:
    ckpt.save(epoch, _state(width, float(epoch)), {"train": {"epoch": epoch}})
  ckpt.close()


def _damage(step_dir, how):
  state_dir = step_dir / "state"
  if how == "data":
    for f in state_dir.rglob("*"):
      if f.is_file() and "/d/" in str(f) and f.stat().st_size > 16:
        f.write_bytes(f.read_bytes()[:8])
  elif how == "manifest":
    f = state_dir / "manifest.ocdbt"
    f.write_bytes(f.read_bytes()[:8])
  elif how == "metadata":
    (state_dir / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["data", "manifest", "metadata"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, how):
  _write(tmp_path)
  _damage(tmp_path / "2", how)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3, config=_config())
  epoch, state, data = ckpt.restore_latest(jax.eval_shape(_state))
  assert epoch == 1 and data == {"train": {"epoch": 1}}
  np.testing.assert_array_equal(state["params"]["kernel"], np.full((3, 3, 1, 4), 1.0))
  damaged = list((tmp_path / checkpoint.DAMAGED).iterdir())
  assert len(damaged) == 1 and damaged[0].name.startswith("2-")
  assert ckpt.latest_epoch() == 1  # a new save goes on from the intact one
  ckpt.save(2, _state(value=5.0), {"train": {"epoch": 2}})
  ckpt.close()
  again = checkpoint.Checkpointer(tmp_path, keep=3, config=_config())
  assert again.restore_latest(jax.eval_shape(_state))[0] == 2


def test_no_checkpoint_restores_gives_a_clear_error(tmp_path):
  _write(tmp_path)
  _damage(tmp_path / "1", "metadata")
  _damage(tmp_path / "2", "manifest")
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3, config=_config())
  with pytest.raises(CheckpointError, match=r"no checkpoint .* restores \(epoch 2: .*epoch 1: "):
    ckpt.restore_latest(jax.eval_shape(_state))


def test_a_checkpoint_of_other_settings_names_the_setting(tmp_path):
  _write(tmp_path, width=4)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3, config=_config(width=8))
  with pytest.raises(CheckpointError, match=r"model.width: 4 in the checkpoint, 8 now") as e:
    ckpt.restore_latest(jax.eval_shape(lambda: _state(width=8)))
  assert "lr" not in str(e.value)  # only the settings that differ
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing moved aside


def test_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="keep"):
    checkpoint.Checkpointer(tmp_path, keep=0, config=_config())


def _mixed_state():
  return {
    "a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
    "b": jnp.float32(7.5),
    "n": jnp.int32(3),
    "rng": jax.random.PRNGKey(5),
    "c": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32),
  }


def _assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_the_state_is_stored_one_array_per_dtype_and_restores_exactly(tmp_path):
  state = _mixed_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, config=_config())
  ckpt.save(1, state, {"train": {"epoch": 1}})
  ckpt.close()
  again = checkpoint.Checkpointer(tmp_path, keep=2, config=_config())
  metadata = again.manager.item_metadata(1)["state"]
  stored = getattr(metadata, "tree", metadata)
  assert sorted(stored) == ["float32", "int32", "uint32"]  # 5 arrays, 3 stored
  assert tuple(stored["float32"].shape) == (6 + 1 + 4,)
  epoch, got, data = again.restore_latest(jax.eval_shape(_mixed_state))
  assert (epoch, data) == (1, {"train": {"epoch": 1}})
  _assert_same(got, state)
  _assert_same(again.restore_state(1, jax.eval_shape(_mixed_state)), state)
  # A packed checkpoint of other shapes is refused by the name of an array that differs.
  other = lambda: {**_mixed_state(), "c": jnp.zeros((5,), jnp.float32)}
  with pytest.raises(CheckpointError, match=r"1 arrays differ, e.g. c: \(4,\) stored, \(5,\) now"):
    again.restore_latest(jax.eval_shape(other))


def test_a_checkpoint_written_one_array_per_leaf_still_restores(tmp_path, monkeypatch):
  state = _mixed_state()
  old_args = lambda self, st, ds: checkpoint.ocp.args.Composite(
    state=checkpoint.ocp.args.StandardSave(st),
    data=checkpoint.ocp.args.JsonSave(ds),
    config=checkpoint.ocp.args.JsonSave(self.settings),
  )
  with monkeypatch.context() as m:
    m.setattr(checkpoint.Checkpointer, "_args", old_args)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, config=_config())
    ckpt.save(1, state, {"train": {"epoch": 1}})
    ckpt.close()
  assert not (tmp_path / "1" / "layout").exists()
  again = checkpoint.Checkpointer(tmp_path, keep=2, config=_config())
  epoch, got, _ = again.restore_latest(jax.eval_shape(_mixed_state))
  assert epoch == 1
  _assert_same(got, state)
  again.save(2, state, {"train": {"epoch": 2}})  # the next save is packed, beside the old one
  again.close()
  assert (tmp_path / "2" / "layout").is_dir()
  _assert_same(
    checkpoint.Checkpointer(tmp_path, keep=2, config=_config()).restore_state(
      1, jax.eval_shape(_mixed_state)
    ),
    state,
  )
