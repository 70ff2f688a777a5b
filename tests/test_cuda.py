"""The GPU paths: training steps and eval logits for each model family, precision, memory format
and compile, against the same weights in fp32 on the CPU; a bit-exact resume through the Trainer's
own checkpoint. Cases marked `cuda` are skipped without a GPU (`pytest -m cuda` runs them on one);
the same checks run on the CPU where they mean something there. The device placement's batches
are checked on CUDA in test_data_pipeline.py."""
import contextlib
import math
import os
import signal

import pytest
import torch
from torch import nn

import cvnets
import loss_fn
import optim
from cvnets.fuse import fold_batchnorm
from engine import checkpoint as ckpt
from engine.loops import AUTOCAST_DTYPES, LoopOptions, Progress, predict, train_one_epoch
from engine.trainer import TrainingInterrupted
from helpers import LOGGER, REPO, last_state, open_trainer, read_rows, tiny_args
from options.config import load_config

# Deterministic cuBLAS for the resume test; read when the first cuBLAS handle is made, so set at
# collection, before any test touches CUDA.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
CLASSES = 200
# ||device - cpu|| / ||cpu|| of the eval logits. fp32 runs with TF32 off (what is left is summation
# order and cuDNN's algorithms); bf16 keeps 8 mantissa bits, fp16 11. Wrong weights or a wrong
# layout give errors near 1.
TOLERANCES = {"none": 1e-3, "bf16": 5e-2, "fp16": 1e-2}
FALL_RATIO = 0.9  # the last loss on the fixed batch must be below this share of the first
LR = {"adamw": 1e-3, "sgd": 0.05}  # not the recipes' warmup, whose first steps barely move
SIZES = {"cuda": (64, 15), "cpu": (8, 6)}  # (batch, steps) of the fixed-batch check


def correctness_cases():
    cases = [pytest.param("cpu", "mobilevit_tiny.yaml", "none", True, False),
             pytest.param("cpu", "mobilevit_tiny.yaml", "bf16", False, False)]
    for config in ("mobilevit_tiny.yaml", "mobilevit_x_small.yaml", "resnet18.yaml"):
        settings = [(p, layout, False) for p in ("none", "bf16", "fp16") for layout in (True, False)]
        for precision, channels_last, compiled in settings + [("bf16", True, True)]:
            cases.append(pytest.param("cuda", config, precision, channels_last, compiled, marks=pytest.mark.cuda))
    return cases


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """Plain fp32 matmuls and convolutions on CUDA (no TF32), for the tight fp32 comparison."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def logits(model, images, opts):
    return next(predict(model, [(images, torch.zeros(len(images), dtype=torch.long))], opts))[0].cpu().double()


def rel_error(value, reference):
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("device, config, precision, channels_last, compiled", correctness_cases())
def test_fixed_batch_training_falls_and_eval_logits_match_fp32_on_the_cpu(device, config, precision, channels_last,
                                                                          compiled):
    cfg = load_config(["--common.config-file", os.path.join(REPO, "config", config)])
    device, (batch, steps) = torch.device(device), SIZES[device]
    torch.manual_seed(0)
    model = cvnets.build_model(cfg.model, CLASSES).to(device, memory_format=torch.channels_last if channels_last
                                                      else torch.contiguous_format)
    if compiled:
        torch._dynamo.reset()  # models of one class share dynamo's recompile limit, past which it runs eager
    train_model = torch.compile(model) if compiled else model
    optimizer, criterion = optim.build_optimizer(model, cfg.optim), loss_fn.build_loss(cfg.loss).to(device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    opts = LoopOptions(device, channels_last, AUTOCAST_DTYPES[precision], log_every_batches=10**9)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(batch, 3, 64, 64, generator=g), torch.randint(0, CLASSES, (batch,), generator=g)
    losses = [train_one_epoch(train_model, [(images, labels)], criterion, optimizer, lambda _: LR[cfg.optim.name],
                              Progress(), opts, 1, scaler=scaler)["loss"] for _ in range(steps)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < FALL_RATIO * losses[0], losses

    reference = cvnets.build_model(cfg.model, CLASSES)
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    expected = logits(reference, images[:32], LoopOptions(torch.device("cpu")))
    with full_fp32(device):
        # the model in eval mode (compiled or not) and the BatchNorm-folded copy the Trainer validates
        for name, evaluated in (("plain", train_model), ("folded", fold_batchnorm(model)[0])):
            error = rel_error(logits(evaluated, images[:32], opts), expected)
            assert error <= TOLERANCES[precision], f"{name}: relative error {error:.2e}"


# ----------------------------------------------------------------------------- resume
class SignalAt(nn.Module):
    """The run's loss, sending SIGUSR1 to this process at call `at`: the Trainer then finishes
    that optimizer step, saves checkpoint_last.pt mid-epoch and stops, as under SLURM."""

    def __init__(self, criterion: nn.Module, at: int) -> None:
        super().__init__()
        self.criterion, self.at, self.calls = criterion, at, 0

    def forward(self, logits, targets, images):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.criterion(logits, targets, images)


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels (attention by plain matmuls, whose backward is deterministic), so that
    a difference can only come from what the checkpoint failed to restore."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def train_run(root, results, label, device, precision, stop_at=None, resume=False):
    """One epoch of 6 batches through main_train's builder and the Trainer; its last checkpoint."""
    args = tiny_args(root, results, label, 1, "--common.device", device, "--common.mixed-precision", precision,
                     *(["--common.resume", "auto"] if resume else []))
    with deterministic():
        trainer, folder = open_trainer(args)  # seeded, as in a fresh process
        if stop_at is not None:
            trainer.parts.criterion = SignalAt(trainer.parts.criterion, stop_at)
        if resume:
            torch.manual_seed(12345)  # what the RNG holds now must not matter: the checkpoint's state counts
        try:
            with pytest.raises(TrainingInterrupted) if stop_at is not None else contextlib.nullcontext():
                trainer.run(folder)
        finally:
            folder.close(LOGGER)
    return last_state(results / label)


def differences(a, b, prefix=""):
    """Names of the tensors and values that differ between two checkpoint dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in sorted(keys, key=str) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{prefix}{i}.")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.shape == b.shape and torch.equal(a, b) else [prefix[:-1]]
    return [] if a == b else [prefix[:-1]]


def resume_differences(root, results, device, precision):
    """What differs between a run stopped after batch 3 of 6 and resumed, and an uninterrupted one:
    names of checkpoint tensors and values, and "metrics" when the metrics rows differ."""
    whole = train_run(root, results, "whole", device, precision)
    if device == "cuda":  # a control: without it, a difference could be the kernels' and not the resume's
        again = train_run(root, results, "again", device, precision)
        compared = ("model", "ema", "optimizer", "scaler", "rng")
        assert not differences({k: whole[k] for k in compared}, {k: again[k] for k in compared}), \
            "two uninterrupted runs differ: the device's kernels are not reproducible"
    train_run(root, results, "split", device, precision, stop_at=3)
    assert last_state(results / "split")["progress"]["batch_in_epoch"] == 3
    split = train_run(root, results, "split", device, precision, resume=True)
    compared = ("model", "ema", "optimizer", "scaler", "progress", "rng")
    rows_differ = read_rows(results / "split") != read_rows(results / "whole")
    return differences({k: whole[k] for k in compared}, {k: split[k] for k in compared}) + ["metrics"] * rows_differ


@pytest.mark.slow  # a stop signal, four runs of the Trainer
@pytest.mark.parametrize("device, precision", [("cpu", "bf16"), pytest.param("cuda", "fp16", marks=pytest.mark.cuda)])
def test_a_run_resumed_mid_epoch_from_the_trainers_checkpoint_is_bit_exact(fake_root, tmp_path, device, precision):
    """fp16 on CUDA: the grad scaler's state travels too (the CPU trains in bf16 without one)."""
    assert resume_differences(fake_root, tmp_path, device, precision) == []


@pytest.mark.slow
def test_the_resume_check_catches_a_checkpoint_that_forgets_the_rng(fake_root, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)  # dropout then draws other masks
    different = resume_differences(fake_root, tmp_path, "cpu", "bf16")
    assert "metrics" in different and any(name.startswith("model.") for name in different)
