"""Prove the GPU path and measure it: one command that ends within a time budget.

    python -m tools.gpu_check [--device auto|cuda|cpu] [--quick] [--json OUT] [--out-dir DIR]
                              [--train-images N] [--time-budget S] [--workers N] [--only SECTIONS]

It prints a progress line per item, then one table, and writes the JSON (atomically, after
every item, so a run killed from outside still leaves what it measured). Sections, in order:

1. correctness: MobileViT-Tiny, x_small and ResNet-18 under fp32, bf16 and fp16 (+ grad
   scaler, CUDA only), channels_last on and off: engine training steps (train_one_epoch) on one
   fixed batch give finite losses that fall, and the trained model's eval logits on the device
   (plain and BatchNorm-folded, as the Trainer validates) match the same weights in fp32 on
   the CPU within TOLERANCES (relative L2 error).
2. resume: k steps, a checkpoint through engine.checkpoint (model, optimizer, grad scaler, EMA,
   schedule, progress, RNG), restored into freshly built objects, k more steps: every tensor
   must equal an uninterrupted run's (torch.equal), deterministic algorithms on. A second
   uninterrupted run is the control: if even it differs, the device's kernels are not
   reproducible and the comparison says nothing ("inconclusive").
3. placement: the training batches of dataset.augment_on device (decoded split on the device,
   and uint8 batches from the workers) equal those of augment_on workers from the same seed, up
   to float rounding (data.build_loaders, the public pipeline).
4. throughput: model-only training and eval images/second of all seven models at two batch
   sizes, bf16 + channels_last on CUDA (tools.benchmark's StepRunner and its timing).
5. end_to_end: real epochs of MobileViT-Tiny through the Trainer on a generated TinyImageNet-
   shaped tree (written in the background by parallel `python -m data.fake` processes), with
   dataset.cache memory and augment_on workers, then device; GPU utilisation from nvidia-smi;
   the ratio to the model-only figure (>= 0.9: the data path is never the bottleneck). Then,
   when time is left, one ResNet-50 epoch.
6. compile: torch.compile correctness checks and throughput, in the order the estimates need
   them, for as long as the budget lasts (compiling costs tens of seconds per model).
7. estimates: minutes of one 200-epoch MobileViT-Tiny run and one 150-epoch ResNet-50 run.

Every section has a deadline (its cumulative share of --time-budget); an item that would not
fit before it, judged by the slowest item of its kind so far (per leaf module for compiles), is
skipped with a note. An item still running OVERRUN_GRACE_S after the budget's end is cut off by a
watchdog, which prints the table and writes the JSON of the rest. --quick shrinks every size (a
CPU smoke run in well under a minute; compile then uses dynamo's eager backend, which checks the
plumbing, not inductor). Exit status: 0 when every check that ran passed (skipped items and
performance targets missed do not count), 1 when one failed, raised or was cut off, 2 for bad
arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from tools.benchmark import StepRunner, _interleaved_seconds, comma_list, print_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "config")
TINY, X_SMALL, XX_SMALL, SMALL = (f"mobilevit_{m}.yaml" for m in ("tiny", "x_small", "xx_small", "small"))
RESNET18, RESNET34, RESNET50 = (f"resnet{d}.yaml" for d in (18, 34, 50))
AUGMENT_TINY = "paper/table4_resnet18_no_vbs_augment_tiny.yaml"  # every augment-tiny transform
ALL_MODELS = (XX_SMALL, X_SMALL, SMALL, TINY, RESNET18, RESNET34, RESNET50)
NUM_CLASSES = 200  # TinyImageNet's
REAL_TRAIN_IMAGES, REAL_VAL_IMAGES = 100_000, 10_000  # TinyImageNet's splits, for the estimates

# Eval logits on the device vs the same weights in fp32 on the CPU: ||device - cpu|| / ||cpu||.
# fp32 is compared with TF32 off (what is left is summation order and cuDNN's algorithms);
# bf16 keeps 8 mantissa bits, fp16 11. A wrong layout or wrong weights gives errors near 1.
TOLERANCES = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}
FALL_RATIO = 0.9  # the last loss on the fixed batch must be below this share of the first
# Images of the fixed batch whose eval logits are compared (eval mode treats each image alone; a
# few keep the CPU reference cheap while the tree's writers keep the CPU cores busy).
EVAL_IMAGES = 32
# Learning rates of the fixed-batch check (not the recipes' warmup, whose first steps barely move).
CHECK_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.05}
PLACEMENT_TOLERANCE = 1e-3  # max |difference| of augmented pixels (values about [0, 1]): a quarter uint8 level
DATA_PATH_RATIO = 0.9  # end-to-end within 10% of model-only: the data path is never the bottleneck
TINY_TARGET_IMAGES_PER_S = 20_000  # issue 17: MobileViT-Tiny end to end on one H200
MIXED_PRECISION = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}  # -> common.mixed_precision

# Each section's share of the budget, in running order. A section must end by the sum of its
# own and the earlier sections' shares, so what one leaves unused, the next gets.
SECTION_SHARES = {"correctness": 0.25, "resume": 0.06, "placement": 0.04, "throughput": 0.17,
                  "end_to_end": 0.30, "compile": 0.18}
RESERVE_S = 5.0  # kept for the estimates, the table and the JSON
OVERRUN_GRACE_S = 3.0  # past the budget's end the watchdog stops the run (an item cannot be interrupted)
# Seconds an item of each kind is expected to take until one has run (then: the longest so far),
# per unit of its size: 1, except compiling, whose time grows with the model's leaf modules
# (MobileViT-Tiny has 86, x_small 187, ResNet-50 172).
FIRST_GUESS_S = {
    "cuda": {"train_check": 8, "resume": 20, "placement": 20, "throughput": 10, "epoch": 60, "epoch_resnet50": 90,
             "compile_check": 1.0, "compile_throughput": 1.0},
    "cpu": {"train_check": 10, "resume": 15, "placement": 15, "throughput": 10, "epoch": 30, "epoch_resnet50": 60,
            "compile_check": 2.0, "compile_throughput": 2.0},
}

logger = logging.getLogger("cvnets")


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Plan:
    """The sizes of every section: FULL on a GPU, QUICK for a CPU smoke run (--quick)."""

    correctness_models: Tuple[str, ...]
    check_batch: int
    check_steps: int
    resume_batch: int
    resume_steps: int  # k: steps before the checkpoint, and as many after it
    placement_configs: Tuple[str, ...]
    placement_batch: int
    placement_batches: int  # compared per epoch, over two epochs
    throughput_models: Tuple[str, ...]
    batches: Tuple[int, int]  # model-only batch sizes; the first is the end-to-end one
    warmup: int
    repeats: int
    steps: int
    classes: int  # of the generated tree
    train_images: int
    e2e_epochs: int  # the last one counts (the first also starts workers and tunes kernels)
    e2e_max_batches: Optional[int]
    compile_backend: str


FULL = Plan(
    correctness_models=(TINY, X_SMALL, RESNET18), check_batch=128, check_steps=25,
    resume_batch=64, resume_steps=4,
    placement_configs=(TINY, X_SMALL, AUGMENT_TINY), placement_batch=32, placement_batches=3,
    throughput_models=ALL_MODELS, batches=(128, 256), warmup=3, repeats=5, steps=10,
    classes=200, train_images=REAL_TRAIN_IMAGES, e2e_epochs=2, e2e_max_batches=None, compile_backend="inductor",
)
QUICK = Plan(
    correctness_models=(TINY,), check_batch=4, check_steps=4,
    resume_batch=4, resume_steps=2,
    placement_configs=(AUGMENT_TINY,), placement_batch=4, placement_batches=2,
    throughput_models=(TINY, RESNET50), batches=(2, 4), warmup=1, repeats=2, steps=1,
    classes=10, train_images=200, e2e_epochs=1, e2e_max_batches=6, compile_backend="eager",
)


@dataclass(frozen=True)
class Setting:
    """How a training step runs: autocast dtype (fp16 adds a grad scaler), layout, compile."""

    dtype: str
    channels_last: bool
    compile: bool = False

    @property
    def label(self) -> str:
        dtype = "fp16+scaler" if self.dtype == "fp16" else self.dtype
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{dtype} {layout} {'compiled' if self.compile else 'eager'}"


# ----------------------------------------------------------------------------- budget and report
class Budget:
    """Deadlines of the sections that run (cumulative shares of the total) and the longest item
    of each kind so far."""

    def __init__(self, seconds: float, first_guess: Mapping[str, float], sections: Sequence[str]) -> None:
        self.start, self.total = time.perf_counter(), seconds
        usable = seconds - min(RESERVE_S, 0.05 * seconds)
        chosen = [name for name in SECTION_SHARES if name in sections]
        whole, done = sum(SECTION_SHARES[name] for name in chosen), 0.0
        self.deadlines: Dict[str, float] = {}
        for name in chosen:
            done += SECTION_SHARES[name]
            self.deadlines[name] = self.start + usable * done / whole
        self.longest: Dict[str, float] = dict(first_guess)
        self._measured: set = set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def room(self, section: str) -> float:
        return self.deadlines[section] - time.perf_counter()

    def expected(self, kind: str, size: float = 1.0) -> float:
        return self.longest[kind] * size

    def fits(self, section: str, kind: str, size: float = 1.0) -> bool:
        return self.expected(kind, size) <= self.room(section)

    def record(self, kind: str, seconds: float, size: float = 1.0) -> None:
        # The first measurement replaces the guess; later ones only raise it.
        rate = seconds / size
        self.longest[kind] = max(self.longest[kind], rate) if kind in self._measured else rate
        self._measured.add(kind)


@dataclass
class Report:
    """Rows per section, notes, and the JSON payload (rewritten after every item and section)."""

    path: Optional[str]
    header: Dict[str, Any]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    running: Optional[Tuple[str, str, str]] = None  # (section, item, setting) in progress

    def add(self, row: Dict[str, Any]) -> Dict[str, Any]:
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)
        progress(f"note: {text}")

    def section(self, name: str) -> List[Dict[str, Any]]:
        return [r for r in self.rows if r["section"] == name]

    def payload(self, elapsed: float) -> Dict[str, Any]:
        sections: Dict[str, List[Dict[str, Any]]] = {}
        for row in self.rows:
            sections.setdefault(row["section"], []).append(row)
        return _finite({**self.header, "elapsed_s": elapsed, "section_seconds": self.seconds,
                        "sections": sections, "notes": self.notes, "failed": self.failed()})

    def write(self, elapsed: float) -> None:
        if self.path:
            from options.files import write_json

            write_json(self.path, self.payload(elapsed))

    def failed(self) -> List[str]:
        return [f"{r['section']} {r['item']} {r['setting']}" for r in self.rows if r["status"] in ("FAIL", "error")]


class Watchdog:
    """Ends the run OVERRUN_GRACE_S after the budget's end if an item is still running then (a
    compile that took far longer than any before it, say): the table and the JSON of what
    finished, the item in progress as an error row, exit status 1. An item cannot be interrupted
    from inside the process; this keeps the promise that the command ends in time."""

    def __init__(self, budget: Budget, report: Report, finish: Callable[[], None],
                 exit: Callable[[int], Any] = os._exit) -> None:
        self.budget, self.report, self.finish, self.exit = budget, report, finish, exit
        self._stopped, self._lock = False, threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:  # waits for a firing watchdog (which then ends the process)
            self._stopped = True
        self._wake.set()

    def _watch(self) -> None:
        end = self.budget.start + self.budget.total + OVERRUN_GRACE_S
        if self._wake.wait(max(end - time.perf_counter(), 0.0)):
            return
        with self._lock:
            if self._stopped:
                return
            section, item, setting = self.report.running or ("(run)", "", "")
            self.report.add(make_row(section, item, setting,
                                     f"cut off: still running {OVERRUN_GRACE_S:.0f}s after the "
                                     f"{self.budget.total:.0f}s budget", "", "error"))
            progress(f"{section} {item} {setting}: cut off at the end of the budget")
            self.finish()
            sys.stdout.flush()
            sys.stderr.flush()
            self.exit(1)


def make_row(section: str, item: str, setting: str, measured: str, criterion: str, status: str,
             **data: Any) -> Dict[str, Any]:
    return {"section": section, "item": item, "setting": setting, "measured": measured, "criterion": criterion,
            "status": status, **data}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become None (the rows say what was not finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_T0 = time.perf_counter()


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {text}", flush=True)


# ----------------------------------------------------------------------------- the run's context
@dataclass
class Context:
    plan: Plan
    device: torch.device
    process: Any  # engine.build.Process
    budget: Budget
    report: Report
    workdir: str
    workers: int
    tree: "TreeBuilder"
    small_tree: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def fast(self) -> Setting:
        """The setting the throughput and end-to-end sections run: bf16 + channels_last on CUDA
        (fp32 on the CPU, where bf16 autocast is slower)."""
        return Setting("bf16" if self.cuda else "fp32", channels_last=True)

    def dtypes(self) -> Tuple[str, ...]:
        return ("fp32", "bf16", "fp16") if self.cuda else ("fp32", "bf16")


def run_item(ctx: Context, deadline: str, kind: str, section: str, item: str, setting: str,
             body: Callable[[], Dict[str, Any]], size: float = 1.0) -> Optional[Dict[str, Any]]:
    """Run one item if it fits before its section's deadline; a row either way (the JSON is
    rewritten after each). An exception becomes an 'error' row (traceback on stderr), so that
    one broken path cannot end the run."""
    budget, report = ctx.budget, ctx.report
    if not budget.fits(deadline, kind, size):
        why = f"needs ~{budget.expected(kind, size):.0f}s, {max(budget.room(deadline), 0):.0f}s left before " \
              f"the {deadline} deadline"
        progress(f"{section} {item} {setting}: skipped ({why})")
        report.add(make_row(section, item, setting, f"skipped: {why}", "", "skipped"))
        return None
    start = time.perf_counter()
    report.running = (section, item, setting)
    try:
        row = body()
    except Exception as e:  # reported, not raised: the rest of the check still runs
        traceback.print_exc(file=sys.stderr)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = make_row(section, item, setting, f"{type(e).__name__}: {message}", "", "error")
    finally:
        report.running = None
    seconds = time.perf_counter() - start
    budget.record(kind, seconds, size)
    row["seconds"] = seconds
    progress(f"{section} {item} {setting}: {row['measured']} [{row['status']}] ({seconds:.1f}s)")
    report.add(row)
    report.write(budget.elapsed())
    return row


# ----------------------------------------------------------------------------- configs and models
def model_config(name: str, changes: Optional[Mapping[str, Any]] = None):
    """config/<name> with dotted overrides, validated."""
    from options.config import load_config, override

    cfg = load_config(["--common.config-file", os.path.join(CONFIGS, name)])
    return override(cfg, changes) if changes else cfg


def stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def loop_options(device: torch.device, setting: Setting):
    from engine.loops import AUTOCAST_DTYPES, LoopOptions

    return LoopOptions(device=device, channels_last=setting.channels_last,
                       autocast_dtype=AUTOCAST_DTYPES[MIXED_PRECISION[setting.dtype]],
                       log_every_batches=10**9)  # the checks read the returned stats, not log lines


def build_on(cfg, device: torch.device, channels_last: bool, seed: int) -> nn.Module:
    import cvnets

    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return cvnets.build_model(cfg.model, NUM_CLASSES).to(device=device, memory_format=fmt)


def compiled(model: nn.Module, backend: str) -> nn.Module:
    # Models of one class share dynamo's per-code cache and its recompile limit; past the limit
    # dynamo silently runs eager. A fresh cache per model keeps every compiled figure compiled.
    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def scaler_for(setting: Setting) -> Optional[torch.amp.GradScaler]:
    return torch.amp.GradScaler("cuda") if setting.dtype == "fp16" else None


def random_batch(batch: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and labels, on the CPU, the same for every device."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 64, 64, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 1. correctness
def rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def full_fp32(on: bool) -> Iterator[None]:
    """Plain fp32 matmuls and convolutions (no TF32), for the tight fp32 comparison."""
    if not on:
        yield
        return
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def eval_logits(model: nn.Module, images: torch.Tensor, opts) -> torch.Tensor:
    from engine.loops import predict

    logits, _ = next(predict(model, [(images, torch.zeros(len(images), dtype=torch.long))], opts))
    return logits.cpu()


def train_check(ctx: Context, config: str, setting: Setting) -> Dict[str, Any]:
    """Steps on one fixed batch: finite and falling losses; eval logits vs the CPU in fp32."""
    import loss_fn
    import optim
    from cvnets.fuse import fold_batchnorm
    from engine.loops import NonFiniteLossError, Progress, train_one_epoch

    plan, device = ctx.plan, ctx.device
    cfg = model_config(config)
    model = build_on(cfg, device, setting.channels_last, seed=0)
    train_model = compiled(model, plan.compile_backend) if setting.compile else model
    optimizer = optim.build_optimizer(model, cfg.optim)
    criterion = loss_fn.build_loss(cfg.loss).to(device)
    scaler, opts = scaler_for(setting), loop_options(device, setting)
    lr = CHECK_LR[cfg.optim.name]
    images, labels = random_batch(plan.check_batch, seed=1)
    batch = [(images.to(device), labels.to(device))]
    losses: List[float] = []
    try:
        for _ in range(plan.check_steps):  # one call per step: each returns the loss of that step
            stats = train_one_epoch(train_model, batch, criterion, optimizer, lambda iteration: lr, Progress(), opts, 1,
                                    scaler=scaler)
            losses.append(stats["loss"])
    except NonFiniteLossError:
        losses.append(float("nan"))
    finite = all(math.isfinite(v) for v in losses)
    falling = finite and losses[-1] < FALL_RATIO * losses[0]

    tolerance = TOLERANCES[setting.dtype]
    errors: Dict[str, Optional[float]] = {"plain": None, "folded": None}
    images = images[:EVAL_IMAGES]
    if finite:
        cpu = torch.device("cpu")
        reference_model = build_on(cfg, cpu, channels_last=False, seed=0)
        reference_model.load_state_dict({k: v.to(cpu) for k, v in model.state_dict().items()})
        reference = eval_logits(reference_model, images, loop_options(cpu, Setting("fp32", False)))
        with full_fp32(setting.dtype == "fp32" and ctx.cuda):
            # the compiled (or plain) model in eval mode, and the folded copy the Trainer validates with
            errors["plain"] = rel_error(eval_logits(train_model, images, opts), reference)
            errors["folded"] = rel_error(eval_logits(fold_batchnorm(model)[0], images, opts), reference)
    worst: Optional[float] = None
    if finite:  # NaN logits must not hide behind max()
        worst = max(errors.values()) if all(math.isfinite(e) for e in errors.values()) else float("nan")
    eval_ok = worst is not None and math.isfinite(worst) and worst <= tolerance
    ok = finite and falling and eval_ok
    shown = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if finite else f"non-finite loss at step {len(losses)}"
    measured = f"{shown} in {len(losses)} steps; eval err {worst:.1e}" if worst is not None else shown
    del train_model, model, optimizer
    release(device)
    return make_row(
        "correctness", stem(config), setting.label, measured,
        f"finite; last < {FALL_RATIO} x first; eval err <= {tolerance:.0e}", "ok" if ok else "FAIL",
        model=stem(config), dtype=setting.dtype, channels_last=setting.channels_last, compile=setting.compile,
        losses=losses, finite=finite, falling=falling, eval_error=worst, eval_error_plain=errors["plain"],
        eval_error_folded=errors["folded"], tolerance=tolerance, eval_ok=eval_ok, batch=plan.check_batch,
        eval_images=len(images), lr=lr, passed=ok,
    )


def section_correctness(ctx: Context) -> None:
    for config in ctx.plan.correctness_models:
        for dtype in ctx.dtypes():
            for channels_last in (True, False):
                setting = Setting(dtype, channels_last)
                run_item(ctx, "correctness", "train_check", "correctness", stem(config), setting.label,
                         lambda: train_check(ctx, config, setting))


# ----------------------------------------------------------------------------- 2. resume
@dataclass
class Training:
    """What one training run holds and a checkpoint must restore."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    ema: Any
    scheduler: Any
    criterion: nn.Module
    opts: Any
    progress: Any

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor the run's outcome consists of, by name."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        for pid, state in self.optimizer.state_dict()["state"].items():
            out.update({f"optimizer.{pid}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
        if self.scaler is not None:
            out["scaler.scale"] = torch.tensor(self.scaler.get_scale())
        return {k: v.detach().clone() for k, v in out.items()}


def new_training(cfg, ctx: Context, setting: Setting, seed: int, total_steps: int) -> Training:
    import loss_fn
    import optim
    from engine.ema import ModelEMA
    from engine.loops import Progress

    model = build_on(cfg, ctx.device, setting.channels_last, seed)
    return Training(model, optim.build_optimizer(model, cfg.optim), scaler_for(setting),
                    ModelEMA(model, cfg.ema.momentum, cfg.ema.warmup),
                    optim.build_scheduler(cfg.scheduler, total_steps), loss_fn.build_loss(cfg.loss).to(ctx.device),
                    loop_options(ctx.device, setting), Progress())


def train_steps(t: Training, batches: Sequence, epoch_batches: int, stop_at: Optional[int] = None) -> None:
    """Batches t.progress.batch_in_epoch.. of one epoch, stopping after batch `stop_at` the way a
    signal stops the Trainer (mid-epoch, the meter kept in the progress)."""
    from engine.loops import train_one_epoch

    train_one_epoch(t.model, batches, t.criterion, t.optimizer, lambda iteration: t.scheduler.lr(0, iteration),
                    t.progress, t.opts, epoch_batches, scaler=t.scaler, ema=t.ema,
                    should_stop=(lambda: stop_at is not None and t.progress.batch_in_epoch >= stop_at))


@contextlib.contextmanager
def deterministic(warn_only: bool) -> Iterator[None]:
    """Deterministic kernels (cuDNN's, torch's, attention by plain matmuls), restored afterwards.

    The check is about what a checkpoint restores, not about kernel choice: attention runs on
    SDPA's math backend, whose backward is deterministic whatever the fused kernels do."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def resume_runs(ctx: Context, cfg, setting: Setting, path: str) -> Tuple[Dict, Dict, Dict]:
    """(uninterrupted, control, resumed) tensors of 2k steps on 2k distinct batches."""
    from engine import checkpoint as ckpt
    from engine.loops import Progress
    from options.config import to_dict

    k = ctx.plan.resume_steps
    batches = [tuple(t.to(ctx.device) for t in random_batch(ctx.plan.resume_batch, seed=100 + i)) for i in range(2 * k)]

    def uninterrupted() -> Dict[str, torch.Tensor]:
        t = new_training(cfg, ctx, setting, seed=0, total_steps=2 * k)
        torch.manual_seed(7)  # dropout draws from here on
        train_steps(t, batches, 2 * k)
        return t.tensors()

    first, control = uninterrupted(), uninterrupted()
    t = new_training(cfg, ctx, setting, seed=0, total_steps=2 * k)
    torch.manual_seed(7)
    train_steps(t, batches, 2 * k, stop_at=k)
    ckpt.save({"kind": ckpt.TRAINING, "config": to_dict(cfg), "model": t.model.state_dict(),
               "optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict() if t.scaler else None,
               "ema": t.ema.state_dict(), "scheduler": t.scheduler.state_dict(), "progress": t.progress.state_dict(),
               "rng": ckpt.rng_state()}, path)
    del t
    torch.manual_seed(12345)  # whatever the RNG holds now must not matter: the checkpoint's state counts
    resumed = new_training(cfg, ctx, setting, seed=1, total_steps=2 * k)  # other initial weights
    state = ckpt.load(path, kind=ckpt.TRAINING)
    resumed.model.load_state_dict(state["model"])
    resumed.optimizer.load_state_dict(state["optimizer"])
    if resumed.scaler is not None:
        resumed.scaler.load_state_dict(state["scaler"])
    resumed.ema.load_state_dict(state["ema"])
    resumed.scheduler.load_state_dict(state["scheduler"])
    resumed.progress = Progress.from_state(state["progress"])
    ckpt.set_rng_state(state["rng"])
    train_steps(resumed, batches[k:], 2 * k)
    return first, control, resumed.tensors()


def mismatches(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> List[str]:
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [name for name in a if not torch.equal(a[name], b[name])]


def resume_check(ctx: Context, config: str) -> Dict[str, Any]:
    # fp16 on CUDA: the grad scaler's state travels too; the CPU has no fp16 training.
    setting = Setting("fp16" if ctx.cuda else "bf16", channels_last=True)
    cfg = model_config(config)
    path = os.path.join(ctx.workdir, f"resume-{stem(config)}.pt")
    lacking: List[str] = []
    try:
        with deterministic(warn_only=False):
            first, control, resumed = resume_runs(ctx, cfg, setting, path)
    except RuntimeError as e:  # an op without a deterministic implementation: run it anyway, say which
        if "deterministic" not in str(e):
            raise
        lacking.append(str(e).strip().splitlines()[0])
        with deterministic(warn_only=True), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, control, resumed = resume_runs(ctx, cfg, setting, path)
        lacking += sorted({str(w.message).splitlines()[0] for w in caught if "deterministic" in str(w.message)})
    finally:
        if os.path.exists(path):
            os.remove(path)
    differ, control_differ = mismatches(first, resumed), mismatches(first, control)
    exact = not differ
    status = "ok" if exact else ("inconclusive" if control_differ else "FAIL")
    measured = (f"bit-exact over {len(first)} tensors" if exact else
                f"{len(differ)} of {len(first)} tensors differ (first: {differ[0]})")
    measured += "; control exact" if not control_differ else f"; control differs in {len(control_differ)}"
    release(ctx.device)
    return make_row(
        "resume", stem(config), f"{setting.label}, {ctx.plan.resume_steps}+{ctx.plan.resume_steps} steps", measured,
        "torch.equal on every tensor vs an uninterrupted run", status,
        model=stem(config), dtype=setting.dtype, bit_exact=exact, tensors=len(first), differing=differ[:20],
        control_exact=not control_differ, control_differing=control_differ[:20], nondeterministic_ops=lacking,
        passed=exact,
    )


def section_resume(ctx: Context) -> None:
    for config in ctx.plan.correctness_models:
        run_item(ctx, "resume", "resume", "resume", stem(config), "", lambda: resume_check(ctx, config))


# ----------------------------------------------------------------------------- 3. placement
ARRANGEMENTS = (("workers", "memory"), ("device", "memory"), ("device", "none"))  # (augment_on, cache)


def placement_batches(ctx: Context, cfg) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    import data

    loaders = data.build_loaders(cfg, device=ctx.device)
    got = []
    try:
        for epoch in range(2):
            loaders.train.batch_sampler.set_epoch(epoch)
            for _, (images, targets) in zip(range(ctx.plan.placement_batches), loaders.train):
                got.append((images.float().cpu(), targets.cpu()))
    finally:
        del loaders  # ends its workers
        gc.collect()
    return got


def placement_check(ctx: Context, config: str) -> Dict[str, Any]:
    changes: Dict[str, Any] = {"dataset.root": ctx.small_tree, "dataset.train_batch_size": ctx.plan.placement_batch,
                               "dataset.workers": min(2, ctx.workers), "common.device": ctx.device.type}
    if config == AUGMENT_TINY:  # mixing too: soft targets from the same draws
        changes.update({"image_augmentation.mixup.mixup_alpha": 0.2, "image_augmentation.mixup.cutmix_alpha": 1.0})
    base = model_config(config, changes)
    from options.config import override

    runs = {arr: placement_batches(ctx, override(base, {"dataset.augment_on": arr[0], "dataset.cache": arr[1]}))
            for arr in ARRANGEMENTS}
    reference = runs[ARRANGEMENTS[0]]
    diffs: Dict[str, Optional[float]] = {}
    for arrangement, batches in list(runs.items())[1:]:
        name = f"{arrangement[0]}+cache {arrangement[1]}"
        same_shapes = len(batches) == len(reference) and all(
            a.shape == b.shape and ta.shape == tb.shape for (a, ta), (b, tb) in zip(batches, reference))
        if not same_shapes:
            diffs[name] = None
            continue
        pairs = list(zip(batches, reference))
        image_diff = max(float((a - b).abs().max()) for (a, _), (b, _) in pairs)
        target_diff = max(float((ta.double() - tb.double()).abs().max()) for (_, ta), (_, tb) in pairs)
        diffs[name] = max(image_diff, target_diff)
    worst = max((d for d in diffs.values() if d is not None), default=None)
    ok = bool(diffs) and all(d is not None and d <= PLACEMENT_TOLERANCE for d in diffs.values())
    crops = sorted({b.shape[-1] for b, _ in reference})
    measured = (f"max diff {worst:.1e} over {len(reference)} batches, crops {crops}" if worst is not None
                else "batch shapes differ")
    return make_row(
        "placement", stem(config), "device (cache memory, none) vs workers", measured,
        f"max |diff| <= {PLACEMENT_TOLERANCE:.0e} (images and targets)", "ok" if ok else "FAIL",
        config=config, max_diff=diffs, batches=len(reference), crop_sizes=crops, equal=ok, passed=ok,
    )


def section_placement(ctx: Context) -> None:
    for config in ctx.plan.placement_configs:
        run_item(ctx, "placement", "placement", "placement", stem(config), "", lambda: placement_check(ctx, config))


# ----------------------------------------------------------------------------- 4. throughput
def throughput(ctx: Context, config: str, batch: int, setting: Setting) -> Dict[str, Any]:
    """Model-only training and eval images/second: tools.benchmark's StepRunner and timing."""
    import cvnets

    plan = ctx.plan
    cfg = model_config(config)
    if setting.compile:
        torch._dynamo.reset()  # see compiled()
    torch.manual_seed(0)
    runner = StepRunner(cvnets.build_model(cfg.model, NUM_CLASSES), cfg, ctx.device, setting.dtype,
                        "channels_last" if setting.channels_last else "contiguous", setting.compile, batch,
                        cfg.sampler.crop_size, NUM_CLASSES, fold_eval=True)
    seconds = _interleaved_seconds({"m": runner}, ("train", "eval"), plan.warmup, plan.repeats, plan.steps, ctx.device)
    train, evaluation = (batch * plan.steps / statistics.median(seconds[("m", mode)]) for mode in ("train", "eval"))
    peak = runner.peak_mib("train")
    del runner
    release(ctx.device)
    peak_text = f", peak {peak:,.0f} MiB" if peak is not None else ""
    return make_row(
        "throughput", stem(config), f"batch {batch} {setting.label}",
        f"train {train:,.0f} img/s, eval {evaluation:,.0f} img/s{peak_text}", "", "-",
        model=stem(config), batch=batch, dtype=setting.dtype, channels_last=setting.channels_last,
        compile=setting.compile, train_images_per_s=train, eval_images_per_s=evaluation, peak_mib=peak,
        image_size=cfg.sampler.crop_size, run_seconds={m: seconds[("m", m)] for m in ("train", "eval")},
    )


def section_throughput(ctx: Context) -> None:
    waited = ctx.tree.wait_seconds()  # the tree's writers would compete with the timed steps for the CPU
    if waited > 1:
        ctx.report.note(f"throughput waited {waited:.0f}s for the generated tree's writers to finish")
    for config in ctx.plan.throughput_models:
        for batch in ctx.plan.batches:
            run_item(ctx, "throughput", "throughput", "throughput", stem(config), f"batch {batch} {ctx.fast.label}",
                     lambda: throughput(ctx, config, batch, ctx.fast))


def model_only(ctx: Context, config: str, batch: int, compile: Optional[bool] = False) -> Optional[Dict[str, Any]]:
    """The throughput row of (config, batch) that ran, eager or compiled (None: the faster)."""
    rows = [r for r in ctx.report.section("throughput") if r.get("model") == stem(config) and r.get("batch") == batch
            and (compile is None or r.get("compile") == compile)]
    return max(rows, key=lambda r: r["train_images_per_s"], default=None)


# ----------------------------------------------------------------------------- 5. end to end
class UtilisationSampler:
    """GPU utilisation (percent) read with nvidia-smi every INTERVAL_S while the block runs."""

    INTERVAL_S = 0.25
    QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

    def __init__(self, device: torch.device) -> None:
        self.gpu = nvidia_smi_id(device)
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def available(self) -> bool:
        return self.gpu is not None and shutil.which("nvidia-smi") is not None

    def __enter__(self) -> "UtilisationSampler":
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            try:
                out = subprocess.run(self.QUERY + ["-i", self.gpu], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                continue

    def mean(self) -> Optional[float]:
        return statistics.fmean(self.samples) if self.samples else None


def nvidia_smi_id(device: torch.device) -> Optional[str]:
    """The id nvidia-smi knows `device` by (CUDA_VISIBLE_DEVICES renumbers what CUDA sees)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    return entries[index] if index < len(entries) else None


def epoch_config(ctx: Context, config: str, placement: str):
    plan = ctx.plan
    changes: Dict[str, Any] = {
        "dataset.root": ctx.tree.root, "dataset.cache": "memory", "dataset.augment_on": placement,
        "dataset.workers": ctx.workers, "common.device": ctx.device.type, "common.results_loc": ctx.workdir,
        "common.run_label": f"epoch-{stem(config)}-{placement}", "common.resume": None,
        "common.mixed_precision": MIXED_PRECISION[ctx.fast.dtype], "common.channels_last": True,
        "common.compile": False, "common.tensorboard": False,
        "common.max_batches_per_epoch": plan.e2e_max_batches,
        # the model-only figure it is compared with ran at this batch (the recipes' 128 in full)
        "dataset.train_batch_size": plan.batches[0],
    }
    return model_config(config, changes)


def epoch_run(ctx: Context, config: str, placement: str, epochs: int) -> Dict[str, Any]:
    """Real epochs through the Trainer in a fresh run folder; the last epoch's figures count."""
    from engine.build import build_trainer, run_dir_for
    from engine.run_folder import RunFolder, read_metrics

    root = ctx.tree.wait()
    cfg = epoch_config(ctx, config, placement)
    start = time.perf_counter()
    trainer = build_trainer(cfg, ctx.process)  # decodes the split into memory (and uploads it)
    setup = time.perf_counter() - start
    folder = RunFolder(run_dir_for(cfg)).open(logger)
    rows: List[Dict[str, Any]] = []
    try:
        for epoch in range(1, epochs + 1):
            if rows and rows[-1]["wall_s"] * 1.3 > ctx.budget.room("end_to_end"):
                ctx.report.note(f"{stem(config)} {placement}: epoch {epoch} skipped (budget); epoch {epoch - 1} counts")
                break
            with UtilisationSampler(ctx.device) as sampler:
                wall = time.perf_counter()
                trainer.run(folder, stop_after_epoch=epoch)
                wall = time.perf_counter() - wall
            metrics = read_metrics(folder.path)[-1]
            rows.append({**{k: metrics[k] for k in ("images_per_second", "train_seconds", "epoch_seconds",
                                                     "train_images", "val_images", "val_loss", "train_loss")},
                         "wall_s": wall, "gpu_util_mean": sampler.mean(), "gpu_util_samples": len(sampler.samples)})
    finally:
        folder.close(logger)
        del trainer
        release(ctx.device)
    last = rows[-1]
    batch = cfg.dataset.train_batch_size
    ips = last["images_per_second"]
    model_row = model_only(ctx, config, batch) if config == TINY else None
    ratio = ips / model_row["train_images_per_s"] if model_row else None
    util = last["gpu_util_mean"]
    parts = [f"{ips:,.0f} img/s (epoch {len(rows)})"]
    if ratio is not None:
        parts.append(f"{ratio:.2f} of model-only")
    parts.append(f"GPU util {util:.0f}%" if util is not None else "GPU util n/a")
    parts.append(f"setup {setup:.0f}s")
    criterion, status = "", "-"
    if config == TINY and ctx.cuda:
        criterion = f">= {DATA_PATH_RATIO} of model-only; >= {TINY_TARGET_IMAGES_PER_S:,} img/s"
        status = "ok" if ratio is not None and ratio >= DATA_PATH_RATIO and ips >= TINY_TARGET_IMAGES_PER_S else "below"
    tree = ctx.tree
    return make_row(
        "end_to_end", stem(config),
        f"augment_on {placement}, cache memory, batch {batch}, {ctx.fast.label}, {tree.train_images:,}-image tree",
        "; ".join(parts), criterion, status,
        model=stem(config), placement=placement, batch=batch, images_per_s=ips, ratio_to_model_only=ratio,
        never_bottleneck=(ratio >= DATA_PATH_RATIO) if ratio is not None else None, setup_s=setup, epochs=rows,
        workers=ctx.workers if placement == "workers" else 0, tree_train_images=tree.train_images,
        tree_val_images=tree.val_images, tree_root=root, max_batches_per_epoch=ctx.plan.e2e_max_batches,
        gpu_util_mean=util, nvidia_smi=UtilisationSampler(ctx.device).available,
    )


def section_end_to_end(ctx: Context) -> None:
    for placement in ("workers", "device"):
        run_item(ctx, "end_to_end", "epoch", "end_to_end", stem(TINY), f"augment_on {placement}",
                 lambda: epoch_run(ctx, TINY, placement, ctx.plan.e2e_epochs))
    best = best_epoch_row(ctx, TINY)
    if best is None:
        return
    predicted = resnet50_epoch_estimate(ctx, model_config(RESNET50, {"dataset.root": ctx.tree.root}))
    if predicted is not None:  # the predicted epoch with a margin, plus decoding the split
        ctx.budget.longest["epoch_resnet50"] = 1.5 * predicted["epoch_seconds"] + best["setup_s"]
    run_item(ctx, "end_to_end", "epoch_resnet50", "end_to_end", stem(RESNET50), f"augment_on {best['placement']}",
             lambda: epoch_run(ctx, RESNET50, best["placement"], 1))


def best_epoch_row(ctx: Context, config: str) -> Optional[Dict[str, Any]]:
    rows = [r for r in ctx.report.section("end_to_end") if r.get("model") == stem(config) and r["status"] != "error"
            and r.get("images_per_s")]
    return max(rows, key=lambda r: r["images_per_s"], default=None)


# ----------------------------------------------------------------------------- 6. compile
@functools.lru_cache(maxsize=None)
def leaf_modules(config: str) -> int:
    """Modules without children: what compile time grows with."""
    import cvnets

    model = cvnets.build_model(model_config(config).model, NUM_CLASSES)
    return sum(1 for m in model.modules() if not any(True for _ in m.children()))


def section_compile(ctx: Context) -> None:
    """Compiled checks and throughput, most needed first, while the budget lasts."""
    setting = replace(ctx.fast, compile=True)
    first, second = ctx.plan.batches

    def check(config: str, s: Setting = setting) -> Callable[[], None]:
        return lambda: run_item(ctx, "compile", "compile_check", "correctness", stem(config), s.label,
                                lambda: train_check(ctx, config, s), size=leaf_modules(config))

    def timing(config: str, batch: int) -> Callable[[], None]:
        def go() -> None:
            family = "resnet" if config.startswith("resnet") else "mobilevit"
            passed = [r for r in ctx.report.section("correctness") if r.get("compile") and r.get("passed")
                      and r["model"].startswith(family)]
            if not passed:
                progress(f"throughput {stem(config)} batch {batch} compiled: not timed "
                         f"(no compiled {family} check passed)")
                return
            run_item(ctx, "compile", "compile_throughput", "throughput", stem(config), f"batch {batch} {setting.label}",
                     lambda: throughput(ctx, config, batch, setting), size=leaf_modules(config))
        return go

    if ctx.plan.compile_backend != "inductor":
        ctx.report.note(f"compile uses dynamo's {ctx.plan.compile_backend!r} backend here (plumbing only); "
                        "compiled throughput needs inductor and is not timed")
        steps = [check(TINY)]
    else:
        rest = [m for m in ctx.plan.throughput_models if m not in (TINY, RESNET50)]
        steps = [check(TINY), timing(TINY, first), check(RESNET18), timing(RESNET50, first), check(X_SMALL),
                 timing(TINY, second), timing(RESNET50, second)]
        steps += [timing(m, b) for m in rest for b in (first, second)]
        steps += [check(m, Setting(d, True, True)) for d in ctx.dtypes() if d != setting.dtype
                  for m in ctx.plan.correctness_models]
    for step in steps:
        step()


# ----------------------------------------------------------------------------- 7. estimates
def real_epoch_seconds(row: Dict[str, Any]) -> float:
    """Seconds of one epoch on the real splits from an end-to-end row's last epoch: training at
    its images/second over 100,000 images, the rest (validation of model and EMA, checkpoints)
    scaled from its validation images to 10,000."""
    epoch = row["epochs"][-1]
    rest = max(epoch["epoch_seconds"] - epoch["train_seconds"], 0.0)
    return REAL_TRAIN_IMAGES / epoch["images_per_second"] + rest * REAL_VAL_IMAGES / max(epoch["val_images"], 1)


def pixels_per_image(cfg) -> float:
    """Mean pixels per training image of the config's sampler over one epoch, relative to the
    base crop (the variable batch sampler's larger crops cost more), from its batch_sampler."""
    import data
    from options.config import override

    loaders = data.build_loaders(override(cfg, {"dataset.cache": "none", "dataset.workers": 0,
                                                "common.device": "cpu"}))
    sampler = loaders.train.batch_sampler
    sampler.set_epoch(0)
    specs = list(sampler)
    base = cfg.sampler.crop_size ** 2
    return sum(len(s) * s.crop_size ** 2 for s in specs) / (base * sum(len(s) for s in specs))


def resnet50_epoch_estimate(ctx: Context, cfg) -> Optional[Dict[str, Any]]:
    """ResNet-50's epoch from its model-only figures (eager, as the end-to-end epochs ran),
    scaled by MobileViT-Tiny's end-to-end / model-only ratio and by its sampler's pixels; None
    when a figure is missing."""
    tiny = best_epoch_row(ctx, TINY)
    train, evaluation = model_only(ctx, RESNET50, ctx.plan.batches[0]), model_only(ctx, RESNET50, ctx.plan.batches[-1])
    if tiny is None or tiny.get("ratio_to_model_only") is None or train is None or evaluation is None:
        return None
    factor = pixels_per_image(cfg)
    ratio = tiny["ratio_to_model_only"]
    train_s = REAL_TRAIN_IMAGES * factor / (train["train_images_per_s"] * ratio)
    eval_s = 2 * REAL_VAL_IMAGES / evaluation["eval_images_per_s"]  # the model and its EMA
    epoch = train_s + eval_s
    how = (f"model-only {train['train_images_per_s']:,.0f} img/s ({train['setting']}) x Tiny's end-to-end ratio "
           f"{ratio:.2f} / {factor:.2f} (pixels per image of its variable batch sampler vs 64 px), + 2 x 10,000 val "
           f"images (model and EMA) at {evaluation['eval_images_per_s']:,.0f} img/s")
    return {"epoch_seconds": epoch, "how": how, "pixel_factor": factor}


def mark_fastest(ctx: Context) -> None:
    """Where a model and batch size were timed eager and compiled, mark the faster."""
    groups: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for row in ctx.report.section("throughput"):
        if row.get("train_images_per_s"):
            groups.setdefault((row["model"], row["batch"]), []).append(row)
    for (model, batch), rows in groups.items():
        if len(rows) > 1:
            best = max(rows, key=lambda r: r["train_images_per_s"])
            best["status"] = "fastest"
            eager = next(r for r in rows if not r["compile"])
            if best is not eager:
                speedup = best["train_images_per_s"] / eager["train_images_per_s"]
                ctx.report.note(f"{model} batch {batch}: compiled trains {speedup:.2f}x as fast as eager "
                                "(the end-to-end epochs and estimates ran eager)")


def section_estimates(ctx: Context) -> None:
    """Minutes of one full run of each: MobileViT-Tiny from its end-to-end epochs, ResNet-50 from
    its own end-to-end epoch when one ran, else from its model-only figure (resnet50_epoch_estimate)."""
    mark_fastest(ctx)
    scaled = ctx.tree.train_images != REAL_TRAIN_IMAGES or ctx.plan.e2e_max_batches is not None
    source = (f"a {ctx.tree.train_images:,}-image tree{' (capped epochs)' if ctx.plan.e2e_max_batches else ''}, "
              "scaled to 100,000 train + 10,000 val images" if scaled else "the 100,000-image tree")
    resnet_cfg = model_config(RESNET50, {"dataset.root": ctx.tree.root})
    for config in (TINY, RESNET50):
        epochs = model_config(config).scheduler.max_epochs
        direct = best_epoch_row(ctx, config)
        if direct is not None:
            epoch = real_epoch_seconds(direct)
            how = (f"measured end to end: {direct['epochs'][-1]['images_per_second']:,.0f} train img/s "
                   f"(augment_on {direct['placement']}, epoch {len(direct['epochs'])}) on {source}, plus its "
                   "validation and checkpoint time")
            estimate: Optional[Dict[str, Any]] = {"epoch_seconds": epoch, "how": how, "pixel_factor": None}
        else:
            estimate = resnet50_epoch_estimate(ctx, resnet_cfg) if config == RESNET50 else None
        if estimate is None:
            ctx.report.add(make_row("estimate", stem(config), f"{epochs} epochs", "no figure to estimate from", "",
                                    "skipped"))
            continue
        minutes = epochs * estimate["epoch_seconds"] / 60
        basis = "end to end" if direct is not None else "model-only x Tiny's ratio"
        ctx.report.add(make_row("estimate", stem(config), f"{epochs} epochs",
                                f"{minutes:,.1f} min ({estimate['epoch_seconds']:.1f}s per epoch)", basis, "-",
                                model=stem(config), epochs=epochs, minutes=minutes,
                                epoch_seconds=estimate["epoch_seconds"], how=estimate["how"],
                                measured_directly=direct is not None, pixel_factor=estimate["pixel_factor"],
                                scaled=scaled))
        ctx.report.note(f"estimate {stem(config)}: {estimate['how']}")


# ----------------------------------------------------------------------------- the generated tree
class TreeBuilder:
    """The end-to-end section's TinyImageNet-shaped tree, written in the background.

    Shards of SHARD_CLASSES classes are written by parallel `python -m data.fake` processes
    (plain data generation: no torch work, no CUDA) and merged into one tree. A shard's classes
    look like the same-numbered classes of every other shard: this tree measures throughput; it
    is not meant to be learnt. A tree left in --out-dir by an earlier run is reused.
    """

    SHARD_CLASSES = 10
    MARKER = "gpu_check_tree.txt"

    def __init__(self, root: str, classes: int, train_per_class: int, val_per_class: int, processes: int) -> None:
        self.root, self.classes = root, classes
        self.train_per_class, self.val_per_class, self.processes = train_per_class, val_per_class, processes
        self.spec = f"{classes} classes x {train_per_class} train + {val_per_class} val\n"
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None
        self._waited = 0.0
        self.seconds: Optional[float] = None

    @property
    def train_images(self) -> int:
        return self.classes * self.train_per_class

    @property
    def val_images(self) -> int:
        return self.classes * self.val_per_class

    def ready(self) -> bool:
        marker = os.path.join(self.root, self.MARKER)
        if not os.path.isfile(marker):
            return False
        with open(marker) as f:
            return f.read() == self.spec

    def start(self) -> None:
        if self.ready():
            progress(f"tree: reusing {self.root} ({self.spec.strip()})")
            self.seconds = 0.0
            return
        if os.path.exists(self.root):
            shutil.rmtree(self.root)  # an interrupted or different tree of an earlier run
        self._thread = threading.Thread(target=self._build, daemon=True)
        self._thread.start()

    def wait_seconds(self) -> float:
        """Wait for the tree (if it is still being written); the seconds waited."""
        start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        return time.perf_counter() - start

    def wait(self) -> str:
        self._waited += self.wait_seconds()
        if self._error is not None:
            raise RuntimeError(f"generating the tree failed: {self._error}")
        return self.root

    def _build(self) -> None:
        start = time.perf_counter()
        try:
            parent = os.path.dirname(self.root)
            shards_dir = tempfile.mkdtemp(prefix=".shards-", dir=parent)
            try:
                shards = self._write_shards(shards_dir)
                merge_shards(shards, self.root)
            finally:
                shutil.rmtree(shards_dir, ignore_errors=True)
            with open(os.path.join(self.root, self.MARKER), "w") as f:
                f.write(self.spec)
            self.seconds = time.perf_counter() - start
            progress(f"tree: wrote {self.train_images + self.val_images:,} images to {self.root} in "
                     f"{self.seconds:.0f}s with {self.processes} processes")
        except Exception as e:  # surfaced by wait()
            self._error = f"{type(e).__name__}: {e}"

    def _write_shards(self, folder: str) -> List[str]:
        sizes = [min(self.SHARD_CLASSES, self.classes - s) for s in range(0, self.classes, self.SHARD_CLASSES)]
        pending = [(i, n, os.path.join(folder, f"shard{i:03d}")) for i, n in enumerate(sizes)]
        running: List[Tuple[subprocess.Popen, str]] = []
        while pending or running:
            while pending and len(running) < self.processes:
                i, n, path = pending.pop(0)
                command = [sys.executable, "-m", "data.fake", path, "--classes", str(n), "--train-per-class",
                           str(self.train_per_class), "--val-per-class", str(self.val_per_class),
                           "--test-per-class", "0", "--seed", str(1000 + i)]
                running.append((subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE, text=True), path))
            time.sleep(0.05)
            for proc, path in list(running):
                if proc.poll() is None:
                    continue
                running.remove((proc, path))
                _, errors = proc.communicate()
                if proc.returncode != 0:
                    for other, _ in running:
                        other.kill()
                    last = errors.strip().splitlines()[-1] if errors.strip() else "no message"
                    raise RuntimeError(f"python -m data.fake {path} exited {proc.returncode}: {last}")
        return [os.path.join(folder, f"shard{i:03d}") for i in range(len(sizes))]


def merge_shards(shards: Sequence[str], root: str) -> None:
    """One tree from shard trees, renamed into place at the end. A wnid drawn by two shards gets
    a fresh one (the train folder is renamed; file names inside are not read by the loader)."""
    from options.files import temp_dir_for

    tmp = temp_dir_for(root, "partial")
    try:
        for sub in ("train", os.path.join("val", "images"), os.path.join("test", "images")):
            os.makedirs(os.path.join(tmp, sub))
        used: set = set()
        rng = np.random.default_rng(0)
        wnids, words, annotations = [], [], []
        for shard in shards:
            with open(os.path.join(shard, "wnids.txt")) as f:
                own = [line.strip() for line in f if line.strip()]
            names = {}
            with open(os.path.join(shard, "words.txt")) as f:
                for line in f:
                    wnid, _, text = line.rstrip("\n").partition("\t")
                    names[wnid] = text
            mapping = {}
            for wnid in own:
                new = wnid
                while new in used:
                    new = f"n{int(rng.integers(10**8)):08d}"
                used.add(new)
                mapping[wnid] = new
                os.rename(os.path.join(shard, "train", wnid), os.path.join(tmp, "train", new))
                wnids.append(new)
                words.append(f"{new}\t{names.get(wnid, new)}")
            with open(os.path.join(shard, "val", "val_annotations.txt")) as f:
                for line in f:
                    name, wnid, *box = line.rstrip("\n").split("\t")
                    new_name = f"val_{len(annotations)}.JPEG"
                    os.rename(os.path.join(shard, "val", "images", name), os.path.join(tmp, "val", "images", new_name))
                    annotations.append("\t".join([new_name, mapping[wnid], *box]))
        for name, lines in (("wnids.txt", wnids), ("words.txt", words),
                            (os.path.join("val", "val_annotations.txt"), annotations)):
            with open(os.path.join(tmp, name), "w") as f:
                f.writelines(line + "\n" for line in lines)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- the table
TABLE_COLUMNS = [("section", "section", "s"), ("item", "item", "s"), ("setting", "setting", "s"),
                 ("measured", "measured", "s"), ("criterion", "criterion", "s"), ("status", "status", "s")]


def print_summary(report: Report, budget: Budget) -> None:
    print()
    print_table(report.rows, TABLE_COLUMNS)
    times = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in report.seconds.items())
    print(f"\ntime: {times}; total {budget.elapsed():.0f}s of a {budget.total:.0f}s budget")
    for text in report.notes:
        print(f"note: {text}")
    failed = report.failed()
    print(f"{len(failed)} check(s) failed: {'; '.join(failed)}" if failed else "every check that ran passed")


# ----------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")  # one line


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = _Parser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0],
                     epilog="Sections and criteria: see the module docstring (python -m pydoc tools.gpu_check).")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a CPU smoke run)")
    parser.add_argument("--json", default="gpu_check.json", metavar="PATH",
                        help="write the results here (default: %(default)s)")
    parser.add_argument("--out-dir", metavar="DIR", help="folder for the generated tree and temporary runs (default: "
                        "a temporary folder, removed at the end; a tree left here by an earlier run is reused)")
    parser.add_argument("--train-images", type=positive(int), metavar="N",
                        help="training images of the generated tree (default 100,000, 200 with --quick); "
                        "figures of a smaller tree are scaled up to 100,000")
    parser.add_argument("--time-budget", type=positive(float), default=480.0, metavar="S",
                        help="seconds the whole check may take (default: %(default)s)")
    parser.add_argument("--workers", type=positive(int), metavar="N",
                        help="DataLoader workers of the end-to-end epochs (default: min(8, CPUs))")
    parser.add_argument("--only", type=comma_list(list(SECTION_SHARES)), default=list(SECTION_SHARES),
                        metavar="SECTIONS",
                        help="comma-separated sections to run, e.g. for a rerun after a fix (default: all; the "
                        "estimates always follow); the budget is shared among them")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.train_images is not None and args.train_images < plan.classes:
        parser.error(f"--train-images: needs at least one image per class ({plan.classes}), got {args.train_images}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.only = [name for name in SECTION_SHARES if name in args.only]  # the running order
    # Deterministic cuBLAS for the resume check; read when the first cuBLAS handle is made, so
    # set before any CUDA work. 8 x 4 MiB is the workspace torch gives Hopper anyway.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from engine.build import setup_process
    from options.config import ConfigError

    plan = QUICK if args.quick else FULL
    if args.train_images:
        plan = replace(plan, train_images=args.train_images)
    try:
        process = setup_process(model_config(TINY, {"common.device": args.device}))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.quick and process.device.type == "cpu":
        # A smoke run of tiny batches: one thread, because OpenMP threads spin-waiting for each
        # other on a shared machine make each step several times slower, not faster.
        torch.set_num_threads(1)
    try:
        return _check(args, plan, process)
    finally:
        torch.set_num_threads(threads)


SECTIONS: Dict[str, Callable[[Context], None]] = {
    "correctness": section_correctness, "resume": section_resume, "placement": section_placement,
    "throughput": section_throughput, "end_to_end": section_end_to_end, "compile": section_compile,
    "estimates": section_estimates,
}


def _check(args: argparse.Namespace, plan: Plan, process: Any) -> int:
    device = process.device
    budget = Budget(args.time_budget, FIRST_GUESS_S[device.type], args.only)
    cpus = os.cpu_count() or 1
    workers = args.workers or min(8 if not args.quick else 2, cpus)
    with contextlib.ExitStack() as stack:
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            base = os.path.abspath(args.out_dir)
        else:
            base = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-"))
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="runs-", dir=base))
        per_class = max(1, plan.train_images // plan.classes)
        tree = TreeBuilder(os.path.join(base, f"tree-{plan.classes}x{per_class}"), plan.classes, per_class,
                           max(1, per_class // 10), processes=max(1, min(cpus // 2, 8)))
        if "end_to_end" in args.only:
            tree.start()
        small_tree = os.path.join(base, "tree-placement")
        if "placement" in args.only and not os.path.isdir(small_tree):
            from data.fake import make_fake_tinyimagenet

            # 192 images: several batches an epoch at the placement batch sizes
            make_fake_tinyimagenet(small_tree, classes=4, train_per_class=48, val_per_class=2, test_per_class=0)
        report = Report(args.json, {"tool": "gpu_check", "quick": args.quick, "budget_s": args.time_budget,
                                    "sections_run": args.only, "device": device_info(device), "plan": asdict(plan),
                                    "workers": workers,
                                    "tolerances": {"eval_logits_rel_l2": TOLERANCES, "fall_ratio": FALL_RATIO,
                                                   "placement_max_abs": PLACEMENT_TOLERANCE,
                                                   "data_path_ratio": DATA_PATH_RATIO}})
        ctx = Context(plan, device, process, budget, report, workdir, workers, tree, small_tree)
        watchdog = Watchdog(budget, report, lambda: finish(report, budget, args.json)).start()
        tree_text = f"; tree {tree.spec.strip()} -> {tree.root}" if "end_to_end" in args.only else ""
        progress(f"gpu_check on {describe(report.header['device'])}; budget {args.time_budget:.0f}s"
                 f"{', quick' if args.quick else ''}; sections {', '.join(args.only)}{tree_text}")
        for name in [*args.only, "estimates"]:
            start = time.perf_counter()
            progress(f"== {name} ({budget.elapsed():.0f}s used)")
            try:
                SECTIONS[name](ctx)
            except Exception as e:  # a section's own bookkeeping failed: report it, go on
                traceback.print_exc(file=sys.stderr)
                report.add(make_row(name, "(section)", "", f"{type(e).__name__}: {e}", "", "error"))
            report.seconds[name] = time.perf_counter() - start
            report.write(budget.elapsed())
        tree.wait_seconds()  # the temporary folder goes only after its writers are done
        report.header["tree_seconds"] = tree.seconds
        watchdog.stop()
        finish(report, budget, args.json)
    return 1 if report.failed() else 0


def finish(report: Report, budget: Budget, path: Optional[str]) -> None:
    report.write(budget.elapsed())
    print_summary(report, budget)
    if path:
        print(f"wrote {path}")


def device_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nvidia_smi=shutil.which("nvidia-smi") is not None)
        gpu = nvidia_smi_id(device)
        if info["nvidia_smi"] and gpu is not None:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", gpu],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
                info["driver"] = out or None
            except (OSError, subprocess.TimeoutExpired):
                info["driver"] = None
    return info


def describe(info: Mapping[str, Any]) -> str:
    if info["type"] == "cuda":
        return f"{info['name']} (sm {info['capability']}, torch {info['torch']}, CUDA {info['cuda']})"
    return f"the CPU ({info['cpus']} cores, torch {info['torch']})"


if __name__ == "__main__":
    sys.exit(main())
