"""Pieces shared by the test modules: the fake tree's size, the environment of child processes,
a tiny training run's arguments, an in-process trainer and readers of its run folder,
trained-looking BatchNorms, an untrained teacher checkpoint."""
import json
import logging
import os
import socket
import sys
from pathlib import Path

import torch
from torch import nn

from engine import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 4 classes x (12 train + 4 val + 2 test) images: enough for every layout rule, fast to write.
FAKE_TREE = dict(classes=4, train_per_class=12, val_per_class=4, test_per_class=2, seed=0)

# One intra-op thread in the test process and in every child it starts: the models and batches
# are small (one thread is fastest), several threads' OpenMP barriers stall badly whenever other
# jobs share the cores, and runs in different processes must compute bit-identical weights.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

LOGGER = logging.getLogger("cvnets")

TIMING_KEYS = {"images_per_second", "epoch_seconds", "train_seconds"}


def child_env(**extra: str) -> dict:
    """The environment for a child process: this one's, one thread, unbuffered output, `extra`."""
    return {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1", **extra}


def tiny_args(root, results, label="run", epochs=2, *extra):
    """A MobileViT-Tiny run small enough for a unit test: 32 px crops, batches of 8, no workers.
    A flag of `extra` replaces the same flag of these defaults (the front door refuses repeats)."""
    return _merged([
        "--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml"),
        "--dataset.root", str(root),
        "--dataset.workers", "0",
        "--dataset.train-batch-size", "8",
        "--dataset.val-batch-size", "8",
        "--sampler.crop-size", "32",
        "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop, size: 32}]",
        "--scheduler.max-epochs", str(epochs),
        "--scheduler.warmup-iterations", "3",
        "--ema.enable", "true",
        "--ema.momentum", "0.1",
        "--common.results-loc", str(results),
        "--common.run-label", label,
        "--common.log-every-batches", "2",
    ], extra)


def _merged(defaults, extra):
    """`defaults` (flag, value pairs) with the flags of `extra` replacing theirs, in order."""
    pairs = dict(zip(defaults[::2], defaults[1::2]))
    rest = []
    i = 0
    while i < len(extra):
        flag = extra[i]
        if "=" not in flag and i + 1 < len(extra) and flag in pairs:
            pairs[flag] = extra[i + 1]
            i += 2
            continue
        rest.append(flag)
        i += 1
    return [item for pair in pairs.items() for item in pair] + rest


def open_trainer(args):
    """(trainer, open run folder) for the config of `args`, built as the front door builds them."""
    from engine.build import build_trainer, run_dir_for, setup_process
    from engine.run_folder import RunFolder
    from options.config import load_config

    cfg = load_config(list(args))
    trainer = build_trainer(cfg, setup_process(cfg))
    return trainer, RunFolder(run_dir_for(cfg)).open(LOGGER)


def train_in_process(args, stop_after_epoch=None):
    """The trainer, after training the run of `args` in this process to its end, or to the end of
    `stop_after_epoch` as a stop signal ends it (resumable); its run folder is closed."""
    trainer, folder = open_trainer(args)
    try:
        trainer.run(folder, stop_after_epoch=stop_after_epoch)
    finally:
        folder.close(LOGGER)
    return trainer


def write_run(folder, rows, summary=None):
    """A run folder as the engine leaves it: metrics.jsonl holding `rows`, summary.json given one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def data_config(root, *flags):
    """The config of loaders over `root` in the main process, batches of 8 (train) and 6 (val)."""
    from options.config import load_config

    return load_config(["--dataset.root", str(root), "--dataset.workers", "0", "--dataset.train-batch-size", "8",
                        "--dataset.val-batch-size", "6", *flags])


def epoch(loader, number=0, start_batch=0):
    """The batches of epoch `number` of a training loader (from batch `start_batch`), on the CPU."""
    loader.batch_sampler.set_epoch(number, start_batch)
    return [(images.cpu(), targets.cpu()) for images, targets in loader]


def read_rows(run_dir):
    """metrics.jsonl without the timing fields (which differ between otherwise equal runs)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def last_state(run_dir):
    return ckpt.load(os.path.join(run_dir, "checkpoint_last.pt"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(args, launcher="torch.distributed.run"):
    """The command line of main_train.py with `args` as two DDP processes under `launcher`."""
    return [sys.executable, "-m", launcher, "--nproc_per_node", "2", "--master_port", str(free_port()),
            os.path.join(REPO, "main_train.py"), *args]


class CodePayload:
    """Unpickling this calls open(marker, "w"): the file `marker` existing proves a loader ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm statistics and affine parameters (fresh ones are the identity,
    which would hide a folding or fusion bug); the model's train/eval mode is left as it was."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d/2d and SyncBatchNorm
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


def fake_wnids(root):
    """The class list of a fake (or real) tree, as the dataset orders it."""
    from data.tinyimagenet import read_classes

    return list(read_classes(str(root)).wnids)


def write_teacher(path, wnids, seed=0, *flags):
    """A weights checkpoint of an untrained model (MobileViT-XXS unless flags say otherwise) for
    the class list `wnids`, in exactly the format the Trainer writes: a teacher for tests that
    must not train one."""
    import cvnets
    from options.config import load_config, to_dict

    cfg = load_config(["--common.config-file", os.path.join(REPO, "config", "mobilevit_xx_small.yaml"), *flags])
    torch.manual_seed(seed)
    model = cvnets.build_model(cfg.model, len(wnids))
    ckpt.save({"config": to_dict(cfg), "num_classes": len(wnids), "wnids": list(wnids),
               "class_names": list(wnids), "params": sum(p.numel() for p in model.parameters()),
               "kind": ckpt.WEIGHTS, "model": model.state_dict(), "is_ema": False, "epoch": 1, "metrics": {}},
              str(path))
    return str(path)
