"""Measuring the engine: its own training step and evaluation timed on a fixed batch, whole Trainer
epochs in a temporary results folder, peak memory, CPU time of a process tree. tools/benchmark.py
is the command line over these; what they time is the code a training run executes, not a copy.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import loss_fn
import optim
from cvnets.fuse import fold_batchnorm
from engine.build import build_trainer, run_dir_for, setup_process
from engine.loggers import TRACKERS
from engine.loops import AUTOCAST_DTYPES, LoopOptions, Progress, evaluate, train_one_epoch
from engine.run_folder import RunFolder, read_metrics
from options.config import override
from options.schema import Config

logger = logging.getLogger("cvnets")
DTYPES = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}  # a benchmark's dtype -> common.mixed_precision
LATENCY_BLOCKS = 5  # the timed calls of each runtime are split into this many turns
SETTLE_CALLS = 2  # untimed calls at the start of each turn
RUNTIMES = ("eager", "torchscript", "onnxruntime")
REAL_TRAIN_IMAGES, REAL_VAL_IMAGES = 100_000, 10_000  # TinyImageNet's splits, for run estimates


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    """One model's training steps and eval forwards on a fixed random batch, run by the engine's
    own train_one_epoch and evaluate (fold_eval: of a BatchNorm-folded copy, as the Trainer
    validates; only this project's models, whose conv -> norm pairs folding knows)."""

    def __init__(self, model, cfg: Config, device, dtype: str, channels_last: bool, compile: bool, batch: int,
                 size: int, num_classes: int, fold_eval: bool = False) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=fmt)
        eval_model = fold_batchnorm(self.model)[0] if fold_eval else self.model
        self.train_model, self.eval_model = ((torch.compile(self.model), torch.compile(eval_model)) if compile
                                             else (self.model, eval_model))
        self.optimizer = optim.build_optimizer(self.model, cfg.optim)
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.criterion = loss_fn.build_loss(cfg.loss).to(device)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
        self.opts = LoopOptions(device=device, channels_last=channels_last,
                                autocast_dtype=AUTOCAST_DTYPES[DTYPES[dtype]], log_every_batches=10**9)
        self.batch = (torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt),
                      torch.randint(0, num_classes, (batch,), device=device))
        self.peak_mib: Dict[str, Optional[float]] = {}

    def run(self, mode: str, steps: int) -> None:
        batches = [self.batch] * steps
        if mode == "train":
            train_one_epoch(self.train_model, batches, self.criterion, self.optimizer, lambda iteration: self.lr,
                            Progress(), self.opts, steps, scaler=self.scaler)
        else:
            evaluate(self.eval_model, batches, self.opts)


def interleaved_seconds(runners: Dict[str, StepRunner], modes: Sequence[str], warmup: int, repeats: int,
                        steps: int, device) -> Dict[Tuple[str, str], List[float]]:
    """Seconds per run of `steps` steps for every (runner, mode), `repeats` runs each, after
    `warmup` untimed steps and one step measuring peak memory.

    The runners and modes take turns within every repeat, so that a slow patch of a shared machine
    hits all of them alike; the runners' order alternates between repeats.
    """
    for runner in runners.values():
        for mode in modes:
            if warmup:
                runner.run(mode, warmup)
            runner.peak_mib[mode] = peak_memory_mib(lambda: runner.run(mode, 1), device)
    seconds: Dict[Tuple[str, str], List[float]] = {(label, mode): [] for label in runners for mode in modes}
    labels = list(runners)
    for repeat in range(repeats):
        for label in labels if repeat % 2 == 0 else labels[::-1]:
            for mode in modes:
                synchronize(device)
                start = time.perf_counter()
                runners[label].run(mode, steps)
                synchronize(device)
                seconds[(label, mode)].append(time.perf_counter() - start)
    return seconds


def train_epochs(cfgs: Dict[str, Config], epochs: int) -> Dict[str, Dict[str, Any]]:
    """Train each config (by label) for `epochs` epochs through the Trainer (main_train's
    build_trainer, checkpoints and records included) in a temporary results folder, the configs'
    epochs interleaved; label -> {"setup_s", "device", "epochs": the Trainer's metrics rows}."""
    runs: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as results:
        no_trackers = {key: False for key, _, _ in TRACKERS}  # measurements, not runs for the user's trackers
        cfgs = {label: override(cfg, {**no_trackers, "common.results_loc": results, "common.run_label": label,
                                      "common.resume": None,
                                      "scheduler.max_epochs": max(cfg.scheduler.max_epochs, epochs)})
                for label, cfg in cfgs.items()}
        process = setup_process(next(iter(cfgs.values())))
        trainers, folders = {}, {}
        for label, cfg in cfgs.items():
            start = time.perf_counter()
            trainers[label] = build_trainer(cfg, process)
            folders[label] = RunFolder(run_dir_for(cfg)).open(logger)
            runs[label] = {"setup_s": time.perf_counter() - start, "device": process.device.type, "epochs": []}
        try:
            for epoch in range(epochs):
                for label, trainer in trainers.items():
                    trainer.run(folders[label], stop_after_epoch=epoch + 1)
                    runs[label]["epochs"].append(read_metrics(folders[label].path)[-1])
        finally:
            for folder in folders.values():
                folder.close(logger)
            del trainers  # ends their loader workers while the folder still exists
    return runs


def run_epoch_seconds(metrics: Dict[str, Any], train_images: int = REAL_TRAIN_IMAGES,
                      val_images: int = REAL_VAL_IMAGES) -> float:
    """Seconds of one epoch over `train_images` training and `val_images` validation images, from
    a Trainer metrics row: training at its images/second, the rest of its epoch (validation of the
    model and its EMA, checkpoints) scaled by validation images."""
    rest = max(metrics["epoch_seconds"] - metrics["train_seconds"], 0.0)
    return train_images / metrics["images_per_second"] + rest * val_images / max(metrics["val_images"], 1)


def peak_memory_mib(step: Callable[[], None], device) -> Optional[float]:
    """Peak memory of one call of step(): CUDA's max allocated; on Linux CPUs the growth of the peak
    resident set (activations and temporaries: the weights are resident already); else None."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(libc, "malloc_trim"):  # glibc: else memory freed by an earlier model hides this one's growth
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = _proc_status_kib("VmRSS")
        step()
        return (_proc_status_kib("VmHWM") - before) / 1024
    except (OSError, ValueError):
        return None


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status")


def tree_cpu_seconds() -> Optional[float]:
    """CPU seconds used so far by this process and its children (the DataLoader workers), from
    /proc; None where it cannot be read."""
    me, total = os.getpid(), 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(os.path.join("/proc", pid, "stat")) as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        except OSError:
            continue  # the process ended meanwhile
        if int(pid) == me or int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def interleaved_latencies(runners: Dict[str, Callable], images, warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each runner after `warmup` untimed calls each.

    The runtimes take turns in blocks of calls, so that load from other processes spreads over
    all of them. Not call by call: each runtime's thread pool keeps spinning briefly after a call
    and would slow the next runtime's; a few untimed calls at the start of every turn let it settle.
    """
    times: Dict[str, List[float]] = {name: [] for name in runners}
    blocks = [repeats // LATENCY_BLOCKS + (i < repeats % LATENCY_BLOCKS) for i in range(LATENCY_BLOCKS)]
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(warmup):
                run(images)
        for calls in filter(None, blocks):
            for name, run in runners.items():
                for _ in range(SETTLE_CALLS):
                    run(images)
                for _ in range(calls):
                    start = time.perf_counter()
                    run(images)
                    times[name].append(time.perf_counter() - start)
    return times


def export_runners(model, size: int, runtimes: Sequence[str],
                   threads: int) -> Tuple[Dict[str, Callable], List[str]]:
    """(runtime (of RUNTIMES) -> callable on images, notes): the models are exported as main_export
    exports them (BatchNorm folded); a runtime whose extra is missing is skipped, and a note says why."""
    from cvnets.export import MissingExtraError, export_model, load_runner, require_onnx

    runners: Dict[str, Callable] = {"eager": model} if "eager" in runtimes else {}
    notes: List[str] = []
    folded, _ = fold_batchnorm(model)
    for runtime in (r for r in RUNTIMES if r in runtimes and r != "eager"):
        fmt = "onnx" if runtime == "onnxruntime" else "torchscript"
        try:
            if fmt == "onnx":
                require_onnx(export=True, run=True)  # before spending seconds on the export
            # One artifact with a symbolic batch axis serves every --batch-sizes entry.
            artifact = export_model(folded, torch.rand(1, 3, size, size), fmt, dynamic_batch=True)
            runners[runtime] = load_runner(artifact, fmt, threads)
        except MissingExtraError as e:
            notes.append(f"{runtime} skipped: {e}")
    return runners, notes


def loader_throughput(loader, batches: int, device) -> Dict[str, Any]:
    """Images/second of a training loader over `batches` batches after one warm-up batch (which
    starts the workers), and CPU microseconds per image of this process and its workers."""
    def endless():
        for epoch in range(10**9):
            loader.batch_sampler.set_epoch(epoch)
            yield from loader

    stream = endless()
    next(stream)
    images, wall, cpu = 0, time.perf_counter(), tree_cpu_seconds()
    for _ in range(batches):
        images += len(next(stream)[0])
    synchronize(device)
    wall, after = time.perf_counter() - wall, tree_cpu_seconds()
    cpu_us = 1e6 * (after - cpu) / images if cpu is not None and after is not None else None
    return {"images": images, "images_per_s": images / wall, "cpu_us_per_image": cpu_us}


def system_info() -> Dict[str, Any]:
    """What the figures were measured on, for a benchmark's JSON."""
    info: Dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30, cuda_version=torch.version.cuda)
    return info
