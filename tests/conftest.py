"""Shared pytest set-up."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from absl import flags

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
  # absl flags raise UnparsedFlagAccessError when read under pytest otherwise.
  flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data (real samples); skips the test when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} not present")
  return SHARED_DATA


@pytest.fixture(scope="session")
def run_data_dir(tmp_path_factory):
  """One data folder for the tests that run whole programs (console scripts, the notebook):
  JAX's persistent compilation cache under it lets the later ones skip compiling."""
  return tmp_path_factory.mktemp("run_data")
