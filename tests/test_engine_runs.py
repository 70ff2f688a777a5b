"""Runs as users run them: concurrent starts, the cache as a pure speed setting, failures recorded,
SIGHUP, resume into a new label, evaluation from anywhere and at another size, readable records."""
import json
import os

import pytest
import torch

from engine.commands import train
from engine_helpers import assert_same_weights, last_state, tiny_args


# ----------------------------------------------------------------------------- the cache changes nothing
def test_cache_and_placement_give_bit_identical_first_epochs(fake_copy, tmp_path, one_thread):
    """Decoding into memory or onto disk, augmenting in workers or on the device: speed settings
    only. The same seed gives the same initial weights and the same first epoch, bit for bit."""
    results = {}
    for cache in ("none", "memory", "disk"):
        for where in ("workers", "device"):
            label = f"{cache}-{where}"
            args = tiny_args(fake_copy, tmp_path, label, 1, "--dataset.cache", cache, "--dataset.augment-on", where,
                             "--dataset.cache-dir", str(tmp_path / "cache"), "--common.max-batches-per-epoch", "3",
                             "--model.mobilevit.dropout", "0.2")
            assert train(args) == 0, label
            with open(tmp_path / label / "metrics.jsonl") as f:
                row = json.loads(f.readline())
            results[label] = (last_state(tmp_path / label)["model"], row["train_loss"], row["val_loss"])
    reference_weights, train_loss, val_loss = results.pop("none-workers")
    for label, (weights, other_train, other_val) in results.items():
        assert (other_train, other_val) == (train_loss, val_loss), label
        assert_same_weights(weights, reference_weights)
