"""build_loaders / build_eval_loader / check_config: the contract the engine relies on; the
workers' signal handling; what the data package logs."""
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from data import Loader, Loaders, build_eval_loader, build_loaders, check_config
from helpers import FAKE_TREE, REPO, data_config as config, epoch

N_TRAIN = FAKE_TREE["classes"] * FAKE_TREE["train_per_class"]
N_VAL = FAKE_TREE["classes"] * FAKE_TREE["val_per_class"]


def test_train_and_val_batches_follow_the_contract(fake_root):
    loaders = build_loaders(config(fake_root))
    assert isinstance(loaders, Loaders) and loaders.num_classes == FAKE_TREE["classes"]
    assert isinstance(loaders.train, Loader) and isinstance(loaders.val, Loader)
    assert loaders.train.device == torch.device("cpu") and loaders.train.placement == "workers"
    assert loaders.wnids == sorted(loaders.wnids) and len(loaders.class_names) == loaders.num_classes
    train = epoch(loaders.train)
    assert len(train) == len(loaders.train) == N_TRAIN // 8
    for images, labels in train:
        assert images.dtype == torch.float32 and images.shape == (8, 3, 64, 64)
        assert 0 <= images.min() and images.max() <= 1
        assert labels.dtype == torch.int64 and labels.shape == (8,)
    val_labels = torch.cat([labels for _, labels in loaders.val])
    assert val_labels.dtype == torch.int64 and len(val_labels) == N_VAL


def test_training_batches_are_full_even_when_the_split_does_not_divide(fake_root):
    loaders = build_loaders(config(fake_root, "--dataset.train-batch-size", "10"))
    sizes = [len(labels) for _, labels in epoch(loaders.train)]
    assert sizes == [10] * -(-N_TRAIN // 10)  # the last batch wraps around to the start
    assert sum(len(labels) for _, labels in loaders.val) == N_VAL  # evaluation: every sample once


def test_variable_batch_sampler_sets_each_batch_crop_size(fake_root):
    loaders = build_loaders(config(fake_root, "--sampler.name", "variable_batch_sampler"))
    schedule = dict(loaders.train.batch_sampler.schedule)
    shapes = {images.shape[-1] for images, _ in epoch(loaders.train)}
    assert shapes <= set(schedule) and len(shapes) > 1
    assert {images.shape[-1] for images, _ in loaders.val} == {64}  # validation stays fixed


def test_mixup_loader_yields_soft_targets(fake_root):
    loaders = build_loaders(config(fake_root, "--image-augmentation.mixup.mixup-alpha", "0.4"))
    _, targets = next(iter(loaders.train))
    assert targets.shape == (8, FAKE_TREE["classes"]) and torch.allclose(targets.sum(1), torch.ones(8))
    _, val_labels = next(iter(loaders.val))
    assert val_labels.dtype == torch.int64  # never mixed


def test_validation_shards_sum_to_the_whole_split(fake_root):
    cfg = config(fake_root)
    seen = []
    for rank in range(3):
        val = build_loaders(cfg, rank=rank, world_size=3).val
        seen += [label for _, labels in val for label in labels.tolist()]
    full = [label for _, labels in build_loaders(cfg).val for label in labels.tolist()]
    assert sorted(seen) == sorted(full) and len(full) == N_VAL


def test_eval_loader_for_test_split_yields_indices_and_file_names(fake_root):
    loader, dataset = build_eval_loader(config(fake_root), "test")
    indices = torch.cat([targets for _, targets in loader])
    assert indices.tolist() == list(range(len(dataset)))
    assert dataset.file_names[0] == "test_0.JPEG"


def test_fake_data_setting_writes_the_tree_and_says_so(tmp_path, caplog):
    root = str(tmp_path / "quickstart")
    cfg = config(root, "--dataset.fake.enable", "true", "--dataset.fake.classes", "3",
                 "--dataset.fake.train-per-class", "8", "--dataset.fake.val-per-class", "2")
    with caplog.at_level(logging.INFO, logger="cvnets.data"):
        loaders = build_loaders(cfg)
    assert loaders.num_classes == 3 and len(loaders.train.dataset) == 24
    messages = [r.getMessage() for r in caplog.records if r.name == "cvnets.data"]
    assert any("writing a generated sample dataset" in m and root in m for m in messages)
    assert [m for m in messages if m.startswith("dataset root:")] == [f"dataset root: {root}"]  # once, absolute


def test_building_a_cache_says_where(fake_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cvnets.data"):
        build_eval_loader(config(fake_root, "--dataset.cache", "disk", "--dataset.cache-dir", str(tmp_path)), "val")
    assert any("building the decoded cache" in r.getMessage() and str(tmp_path / "val-u8.npy") in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------- check_config
@pytest.mark.parametrize("flags, message", [
    (("--image-augmentation.train", "[{name: random_resized_crop, scale: [0.9, 0.1]}]"),
     r"^image_augmentation.train\[0\] \(random_resized_crop\): scale must be"),
    (("--image-augmentation.val", "[{name: resize}, {name: cutout, max_holes: 2}]"),
     r"^image_augmentation.val\[1\] \(cutout\): setting 'max_holes' was renamed"),
    (("--sampler.name", "variable_batch_sampler", "--image-augmentation.train", "[{name: random_gamma}]"),
     r"^sampler.name: variable_batch_sampler varies the crop size, but no transform"),
])
def test_check_config_names_the_key_before_any_data_is_read(tmp_path, flags, message):
    cfg = config(str(tmp_path / "no-dataset-here"), *flags)
    with pytest.raises(ValueError, match=message) as err:
        check_config(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):  # the builders check first, too
        build_loaders(cfg)
    assert not os.path.exists(tmp_path / "no-dataset-here")


# ----------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_loader_workers_leave_signals_to_the_main_process(fake_root, tmp_path):
    """SIGTERM to the whole process group (as timeout or SLURM send it) while iterating with
    workers: the main process gets it, the epoch still completes (no worker died), and the
    process exits without waiting on its workers."""
    script = textwrap.dedent(f"""
        import os, signal, subprocess
        from options.config import load_config
        from data import build_loaders
        received = []
        signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
        cfg = load_config(["--dataset.root", {fake_root!r}, "--dataset.workers", "2",
                           "--dataset.train-batch-size", "4", "--dataset.cache-dir", {str(tmp_path)!r}])
        loader = build_loaders(cfg).train
        loader.batch_sampler.set_epoch(0)
        batches = 0
        for images, labels in loader:
            batches += 1
            if batches == 1:  # sent by another process, like timeout(1) or slurmstepd
                subprocess.run(["kill", "-s", "TERM", "--", f"-{{os.getpgrp()}}"])
        print("batches", batches, "of", len(loader), "received", received, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          start_new_session=True)  # its own process group: the signal stays inside
    assert done.returncode == 0, done.stderr
    assert f"batches {N_TRAIN // 4} of {N_TRAIN // 4} received [{int(signal.SIGTERM)}]" in done.stdout


@pytest.mark.slow
def test_workers_ignore_interrupts_and_end_when_their_loader_ends_them(fake_root):
    """Ctrl-C and SLURM's SIGUSR1 reach the main process only; the main process's own SIGTERM
    (multiprocessing's terminate()) still ends a worker."""
    script = textwrap.dedent("""
        import os, signal, time
        from torch.utils.data import DataLoader
        from data.base import worker_init
        loader = DataLoader(range(8), batch_size=2, num_workers=1, persistent_workers=True,
                            worker_init_fn=worker_init(os.getpid()))
        it = iter(loader)
        next(it)
        (worker,) = it._workers
        for sig in (signal.SIGINT, signal.SIGUSR1):
            os.kill(worker.pid, sig)
        time.sleep(0.5)
        alive = worker.is_alive()
        worker.terminate()  # sent by this (the main) process
        worker.join(timeout=10)
        print("alive after signals", alive, "ended by terminate", not worker.is_alive(), flush=True)
        os._exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "alive after signals True ended by terminate True" in done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_workers_start_reaches_only_the_main_process(stop):
    """A stop signal to the whole group (from another process, as timeout, SLURM or a closed
    terminal send it) the moment a worker is forked, before worker_init runs: the worker must
    not run the main process's handler (the trainer's raises on a second signal)."""
    script = textwrap.dedent(f"""
        import multiprocessing.process, os, signal, subprocess, sys
        from data.base import WorkerDataLoader, worker_init
        MAIN, received = os.getpid(), []

        def handler(signum, frame):
            if os.getpid() != MAIN:  # a worker running the main process's handler: it dies of it
                os._exit(9)
            received.append(signum)

        signal.signal(signal.{stop}, handler)
        start = multiprocessing.process.BaseProcess.start

        def start_then_signal(self):
            start(self)
            kill = f"import os, signal; os.killpg({{os.getpgrp()}}, signal.{stop})"
            subprocess.run([sys.executable, "-c", kill])

        multiprocessing.process.BaseProcess.start = start_then_signal
        loader = WorkerDataLoader(list(range(40)), batch_size=4, num_workers=2, worker_init_fn=worker_init(MAIN))
        batches = [b.tolist() for b in loader]
        print(len(batches), sum(len(b) for b in batches), received, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          start_new_session=True)  # its own process group: the signal stays inside
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["10", "40", f"[{int(getattr(signal, stop))}]"], done.stdout


def test_the_workers_leave_the_engines_every_stop_signal_to_the_main_process():
    from data.base import _STOP_SIGNALS
    from engine.signals import STOP_SIGNALS

    assert _STOP_SIGNALS == set(STOP_SIGNALS)
