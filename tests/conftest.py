"""Shared fixtures: a small fake TinyImageNet tree, written once per test session."""
import os
import shutil

import pytest

from data.fake import make_fake_tinyimagenet

# 4 classes x (12 train + 4 val + 2 test) images: enough for every layout rule, fast to write.
FAKE_TREE = dict(classes=4, train_per_class=12, val_per_class=4, test_per_class=2, seed=0)


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda need a GPU: skipped, saying so, where torch sees none."""
    import torch

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


@pytest.fixture
def fake_copy(fake_root, tmp_path) -> str:
    """A private copy of the fake tree that a test may modify."""
    # Without decoded caches other tests may have built in the shared tree.
    return shutil.copytree(fake_root, os.path.join(tmp_path, "tiny-imagenet-200"),
                           ignore=shutil.ignore_patterns("cache"))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small models and batches run fastest on one, and several
    threads' OpenMP barriers stall badly whenever other jobs share the cores (a CI runner)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
