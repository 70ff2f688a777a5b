"""Runs as users run them: concurrent starts, the cache as a pure speed setting, failures recorded,
SIGHUP, resume into a new label, evaluation from anywhere and at another size, readable records."""
import fcntl
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine.commands import train
from engine_helpers import REPO, assert_same_weights, last_state, tiny_args


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


# ----------------------------------------------------------------------------- concurrent starts
def _env():
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_runs_generating_the_same_dataset_at_once_both_train(tmp_path):
    """Two runs that need the same missing dataset: one writes it (and its decoded cache), the
    other waits and then uses it; both train, nothing half-written is left."""
    root = tmp_path / "data" / "race"
    root.parent.mkdir()
    # Hold the lock a dataset writer takes until both runs wait on it: then they start together.
    gate = os.open(root.parent / ".race.lock", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(gate, fcntl.LOCK_EX)
    procs, outputs = [], []
    for label in ("a", "b"):
        args = tiny_args(root, tmp_path / "results", label, 1, "--dataset.fake.enable", "true",
                         "--dataset.cache", "disk", "--common.max-batches-per-epoch", "2")
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "main_train.py"), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
        outputs.append([])
        threading.Thread(target=lambda p=procs[-1], lines=outputs[-1]: lines.extend(p.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while not all(any("waiting for another process preparing" in line for line in lines) for lines in outputs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.2)
    os.close(gate)
    for p in procs:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err
        assert "Traceback" not in err
    assert os.listdir(root.parent) == ["race"]  # no partial tree, no lock file left behind
    assert sorted(os.listdir(root / "cache")) == ["train-u8.json", "train-u8.npy", "val-u8.json", "val-u8.npy"]
