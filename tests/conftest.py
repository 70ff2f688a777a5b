"""Session set-up: one thread everywhere, the `slow` and `cuda` markers, the shared fake tree and its zip."""
import os
import shutil

import pytest
import torch

from data.fake import make_fake_tinyimagenet
from helpers import FAKE_TREE, ONE_THREAD, tiny_args

# This process now, every child process it starts (they inherit the environment) later.
torch.set_num_threads(1)
os.environ.update(ONE_THREAD)


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda need a GPU: skipped, saying so, where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run pytest -m cuda on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> str:
    """Path of the shared fake tree. Treat it as read-only; use fake_copy to change files."""
    return make_fake_tinyimagenet(os.path.join(tmp_path_factory.mktemp("data"), "tiny-imagenet-200"), **FAKE_TREE)


@pytest.fixture(scope="session")
def trained_run(fake_root, tmp_path_factory):
    """The folder of a finished two-epoch helpers.tiny_args run (EMA on), shared read-only by the
    tests that only read a run's checkpoints and records."""
    from engine.commands import train

    results = tmp_path_factory.mktemp("trained")
    assert train(tiny_args(fake_root, results, "trained", 2)) == 0
    return results / "trained"


@pytest.fixture(scope="session")
def fake_zip(fake_root, tmp_path_factory) -> str:
    """A zip of the fake tree laid out like the official one (tiny-imagenet-200/ at the top)."""
    base = str(tmp_path_factory.mktemp("zip") / "tiny-imagenet-200")
    return shutil.make_archive(base, "zip", os.path.dirname(fake_root), os.path.basename(fake_root))


@pytest.fixture
def fake_copy(fake_root, tmp_path) -> str:
    """A private copy of the fake tree that a test may modify."""
    # Without decoded caches other tests may have built in the shared tree.
    return shutil.copytree(fake_root, os.path.join(tmp_path, "tiny-imagenet-200"),
                           ignore=shutil.ignore_patterns("cache"))


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread, whatever an earlier test set (a benchmark's --threads)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
