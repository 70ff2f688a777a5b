"""Throughput benchmarks, one subcommand each.

    python tools/benchmark.py data --dataset-root ROOT [--config CONFIG] [--workers N]
                                   [--batches N] [--repeats N] [--threads N] [--json OUT]

`data` times the training loader (the config's train augmentations and sampler) reading
JPEGs versus the decoded cache in memory and on disk, and prints images/second.

    python tools/benchmark.py latency --common.config-file CONFIG [--checkpoint PATH]
                                      [--batch-sizes 1 8] [--threads 2] [--repeats N] [--warmup N]
                                      [--runtimes eager,torchscript,onnxruntime] [--json OUT]

`latency` times one CPU forward pass at the config's input size: eager PyTorch, and the
BatchNorm-folded TorchScript and ONNX Runtime exports main_export.py writes (ONNX Runtime is
skipped with a note when the export extra is missing); median and p90 over the repeats.
Without --checkpoint the weights are random, which does not change the work done.

    python tools/benchmark.py model --config CONFIG [--batch-size 128] [--image-size 64]
                                    [--device auto|cpu|cuda] [--dtype fp32|bf16|fp16]
                                    [--memory-format channels_last|contiguous] [--compile]
                                    [--warmup N] [--repeats N] [--steps N] [--threads N]
                                    [--compare-timm] [--json OUT] [--section.key value ...]

`model` times training steps (forward, the config's loss, backward, the config's optimizer)
and eval forwards (of the BatchNorm-folded copy the engine evaluates) on a fixed random batch: images/second from the median of --repeats timed
runs of --steps steps, after --warmup untimed steps, and peak memory. --compare-timm builds
timm's architecturally identical model (same parameter count, same dropout settings) and
times it in the same process, interleaved with ours, so that the ratio holds on a noisy
machine (needs the bench extra). Config overrides such as --model.mobilevit.dropout 0 follow.

    python tools/benchmark.py epoch --dataset-root ROOT --config CONFIG [--caches none,memory,...]
                                    [--repeats N] [--max-batches N] [--workers N]
                                    [--device auto|cpu|cuda] [--threads N] [--json OUT]
                                    [--section.key value ...]

`epoch` trains the real Trainer (main_train.build_trainer) for --repeats epochs per
dataset.cache variant, the variants' epochs interleaved, in a temporary results folder, and
reports the training images/second the Trainer measured, as a ratio to JPEG decoding
(cache none): same model, same augmentations, only the source of the pixels differs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from options.config import ConfigError, load_config, override, to_yaml
from utils.files import atomic_write_text
from options.schema import Config, ModelConfig

Column = Tuple[str, str, str]  # (row key, header, format spec)
BENCH_EXTRA = "pip install -e '.[bench]' (or pip install timm)"


# ----------------------------------------------------------------------------- shared helpers
def print_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column]) -> None:
    """Print rows as an aligned text table; a missing value prints as '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], spec) if row.get(k) is not None else "-" for k, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    if path:
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def base_config(config_file: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """The config file's settings (defaults without one), then dotted command-line overrides."""
    return load_config((["--common.config-file", config_file] if config_file else []) + list(overrides))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def comma_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """argparse type: a comma-separated subset of `choices`."""
    def parse(text: str) -> List[str]:
        items = [item for item in text.split(",") if item]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)} (comma-separated)")
        return items
    return parse


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- data
DATA_COLUMNS: List[Column] = [
    ("cache", "source", "s"),
    ("workers", "workers", "d"),
    ("setup_s", "setup s", ".1f"),
    ("images", "images", "d"),
    ("images_per_s", "images/s", ",.0f"),
    ("speedup", "vs jpeg", ".1f"),
    ("cpu_us_per_image", "cpu us/img", ".0f"),
]
_SOURCES = {"none": "jpeg", "memory": "memory", "disk": "disk", "device": "device"}


def bench_data(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Training-loader images/second reading JPEGs vs the decoded cache (memory, disk)."""
    import torch

    from data import build_loaders  # imported here so other subcommands do not pay for it

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = base_config(args.config)
    rows = []
    for cache in args.caches:
        source, placement = VARIANTS[cache]  # device: the split held in this process, augmented here
        run_cfg = override(cfg, {"dataset.root": args.dataset_root, "dataset.workers": args.workers,
                                 "dataset.cache": source, "dataset.augment_on": placement,
                                 "dataset.persistent_workers": True})
        start = time.perf_counter()
        loader = build_loaders(run_cfg).train
        setup = time.perf_counter() - start
        best = max(_images_per_second(loader, args.batches) for _ in range(args.repeats))
        rows.append({"cache": _SOURCES[cache], "workers": args.workers, "setup_s": setup,
                     "images": best.images, "images_per_s": best.images / best.wall_s,
                     "cpu_us_per_image": 1e6 * best.cpu_s / best.images if best.cpu_s is not None else None})
        del loader  # ends its workers before the next source starts
    jpeg = next((r["images_per_s"] for r in rows if r["cache"] == "jpeg"), None)
    for row in rows:
        row["speedup"] = row["images_per_s"] / jpeg if jpeg else None
    return rows


class Timing(NamedTuple):
    images_per_s: float  # first field: max() picks the fastest run
    images: int
    wall_s: float
    cpu_s: Optional[float]  # of this process and its worker processes (None where /proc is missing)


def _images_per_second(loader, batches: int) -> Timing:
    """Throughput over `batches` batches after one warm-up batch (which starts the workers)."""
    batches_iter = _endless(loader)
    next(batches_iter)
    images, wall, cpu = 0, time.perf_counter(), _tree_cpu_seconds()
    for _ in range(batches):
        images += len(next(batches_iter)[0])
    wall, after = time.perf_counter() - wall, _tree_cpu_seconds()
    return Timing(images / wall, images, wall, after - cpu if cpu is not None and after is not None else None)


def _tree_cpu_seconds() -> Optional[float]:
    """CPU seconds used so far by this process and its live children (the DataLoader workers),
    from /proc; None where it cannot be read."""
    ticks = os.sysconf("SC_CLK_TCK")
    me, total = os.getpid(), 0
    try:
        stats = [os.path.join("/proc", p, "stat") for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for path in stats:
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        except OSError:
            continue  # the process ended meanwhile
        pid, ppid = int(os.path.basename(os.path.dirname(path))), int(fields[1])
        if pid == me or ppid == me:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / ticks


def _endless(loader):
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------- latency
LATENCY_COLUMNS: List[Column] = [
    ("model", "model", "s"),
    ("runtime", "runtime", "s"),
    ("batch", "batch", "d"),
    ("threads", "threads", "d"),
    ("median_ms", "median ms", ".2f"),
    ("p90_ms", "p90 ms", ".2f"),
    ("min_ms", "min ms", ".2f"),
    ("images_per_s", "images/s", ",.0f"),
]
RUNTIMES = ("eager", "torchscript", "onnxruntime")
_RUNTIME_FORMATS = {"torchscript": "torchscript", "onnxruntime": "onnx"}
RANDOM_WEIGHTS_CLASSES = 200  # TinyImageNet's, when neither a checkpoint nor model.num_classes says


def bench_latency(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """CPU latency of one forward pass: eager PyTorch vs the TorchScript and ONNX Runtime exports."""
    import tempfile

    import numpy as np
    import torch

    from engine.export import input_size

    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        raise ConfigError(f"--runtimes: {', '.join(unknown)} unknown; choose from {', '.join(RUNTIMES)}")
    torch.set_num_threads(args.threads)
    model, cfg = _latency_model(args.config, args.checkpoint)
    size = input_size(cfg)
    label = _latency_label(args.config, args.checkpoint)
    print(f"{label}: {cfg.model.name}, input {size}x{size}, {args.threads} threads, "
          f"{args.warmup} warm-up + {args.repeats} timed calls per row")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        runners = _latency_runners(model, size, args.runtimes, args.threads, folder)
        for batch in args.batch_sizes:
            timings = _latencies(runners, torch.rand(batch, 3, size, size), args.warmup, args.repeats)
            for runtime, times in timings.items():
                median, p90 = np.percentile(times, [50, 90])
                rows.append({"model": label, "runtime": runtime, "batch": batch, "threads": args.threads,
                             "median_ms": 1e3 * median, "p90_ms": 1e3 * p90, "min_ms": 1e3 * min(times),
                             "images_per_s": batch / median})
    return rows


def _latency_label(config: Optional[str], checkpoint: Optional[str]) -> str:
    """The config's stem, else the checkpoint's run folder name."""
    if config:
        return os.path.splitext(os.path.basename(config))[0]
    return os.path.basename(os.path.dirname(os.path.abspath(checkpoint))) if checkpoint else "defaults"


def _latency_model(config: Optional[str], checkpoint: Optional[str]) -> Tuple[Any, Config]:
    """(eval-mode model, its config): the checkpoint's weights and stored config, or random weights."""
    import cvnets
    from engine import checkpoint as ckpt
    from engine.evaluation import trained_model

    if checkpoint:
        state = ckpt.load(checkpoint)
        cfg = load_config(["--common.config-file", config] if config else [], base=state["config"])
        return trained_model(cfg, state, use_ema=False, flag="--eval.ema"), cfg
    cfg = base_config(config)
    return cvnets.build_model(cfg.model, RANDOM_WEIGHTS_CLASSES).eval(), cfg


def _latency_runners(model, size: int, runtimes: Sequence[str], threads: int, folder: str) -> Dict[str, Callable]:
    """runtime name -> callable on images; exports are written as main_export does (BN folded)."""
    import torch
    from cvnets.export import MissingExtraError, export_model, load_runner, require_onnx
    from cvnets.fuse import fold_batchnorm

    runners: Dict[str, Callable] = {"eager": model} if "eager" in runtimes else {}
    folded, _ = fold_batchnorm(model)
    example = torch.rand(1, 3, size, size)
    for runtime in (r for r in RUNTIMES if r in runtimes and r != "eager"):
        fmt = _RUNTIME_FORMATS[runtime]
        path = os.path.join(folder, f"model.{fmt}")
        try:
            if fmt == "onnx":
                require_onnx(export=True, run=True)  # before spending seconds on the export
            # One artifact with a symbolic batch axis serves every --batch-sizes entry.
            export_model(folded, example, path, fmt, dynamic_batch=True)
            runners[runtime] = load_runner(path, fmt, threads)
        except MissingExtraError as e:
            print(f"note: {runtime} skipped: {e}", file=sys.stderr)
    return runners


LATENCY_BLOCKS = 5  # the timed calls of each runtime are split into this many turns
SETTLE_CALLS = 2  # untimed calls at the start of each turn


def _latencies(runners: Dict[str, Callable], images, warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each runner on `images`, after `warmup` untimed calls each (lazy init,
    allocator, TorchScript's profiling runs).

    The runtimes take turns in blocks of calls, so that load from other processes spreads over
    all of them rather than hitting whichever ran at the time. Not call by call: each runtime's
    thread pool keeps spinning briefly after a call, which would slow the next runtime's call;
    a few untimed calls at the start of every turn let that settle.
    """
    import torch

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


# ----------------------------------------------------------------------------- model
MODEL_COLUMNS: List[Column] = [
    ("model", "model", "s"),
    ("mode", "mode", "s"),
    ("images_per_s", "images/s", ",.1f"),
    ("best_images_per_s", "best", ",.1f"),
    ("ms_per_step", "ms/step", ",.1f"),
    ("spread", "spread", ".0%"),
    ("peak_mib", "peak MiB", ",.0f"),
    ("vs_timm", "ours/timm", ".2f"),
]
MODES = ("train", "eval")
DTYPES = ("fp32", "bf16", "fp16")
MEMORY_FORMATS = ("channels_last", "contiguous")
TIMM_MOBILEVIT = {"xx_small": "mobilevit_xxs", "x_small": "mobilevit_xs", "small": "mobilevit_s"}
TIMM_RESNET = {18: "resnet18", 34: "resnet34", 50: "resnet50"}


def bench_model(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Training-step and eval images/second and peak memory of the config's model (and timm's twin)."""
    import torch

    import cvnets
    from engine.utils import resolve_device

    device = resolve_device(args.device)
    if args.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs CUDA (it trains with a gradient scaler); use bf16 or fp32 on the CPU")
    if args.compare_timm:
        _import_timm()  # fail before building anything
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = base_config(args.config, args.overrides)
    fmt = args.memory_format or ("channels_last" if cfg.common.channels_last else "contiguous")
    num_classes = cfg.model.num_classes or RANDOM_WEIGHTS_CLASSES
    size = args.image_size or cfg.sampler.crop_size
    models = {"ours": cvnets.build_model(cfg.model, num_classes)}
    if args.compare_timm:
        name, twin, note = timm_twin(cfg.model, num_classes, _params(models["ours"]))
        print(note)
        if twin is not None:
            models[f"timm {name}"] = twin
    runners = {label: StepRunner(model, cfg, device, args.dtype, fmt, args.compile, args.batch_size, size, num_classes,
                                 fold_eval=label == "ours")
               for label, model in models.items()}
    label = os.path.splitext(os.path.basename(args.config or "defaults"))[0]
    print(f"{label}: {cfg.model.name}, {_params(models['ours']):,} params, batch {args.batch_size} at {size}x{size}, "
          f"{device.type}, {args.dtype}, {fmt}, {torch.get_num_threads()} threads{', compiled' if args.compile else ''}; "
          f"{args.warmup} warm-up + median of {args.repeats} x {args.steps} steps, models interleaved; "
          f"peak memory: {'max allocated' if device.type == 'cuda' else 'growth of the peak RSS during one step'}")
    seconds = _interleaved_seconds(runners, args.modes, args.warmup, args.repeats, args.steps, device)
    settings = {"device": device.type, "dtype": args.dtype, "memory_format": fmt, "batch": args.batch_size,
                "image_size": size, "threads": torch.get_num_threads(), "compile": args.compile}
    rows = []
    images = args.batch_size * args.steps
    for (model, mode), times in seconds.items():
        median = statistics.median(times)
        rows.append({"model": model, "mode": mode, "images_per_s": images / median, "best_images_per_s": images / min(times),
                     "ms_per_step": 1e3 * median / args.steps, "spread": (max(times) - min(times)) / median,
                     "peak_mib": runners[model].peak_mib(mode), "params": _params(models[model]),
                     "run_seconds": times, **settings})
    _add_timm_ratio(rows, seconds)
    return rows


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"--compare-timm needs timm, which the bench extra installs: {BENCH_EXTRA}") from None
    return timm


def timm_twin(cfg: ModelConfig, num_classes: int, our_params: int):
    """(timm name, model or None, a note saying what was compared or why nothing was).

    Only an architecturally identical model counts: the same layers and, as a check, the same
    parameter count. Its dropout settings are set to ours, so both do the same work.
    """
    name, why_not = _timm_name(cfg)
    if name is None:
        return None, None, f"note: no timm twin for this model: {why_not}"
    timm = _import_timm()
    model = timm.create_model(name, num_classes=num_classes, drop_rate=cfg.classifier_dropout)
    if cfg.name == "mobilevit":
        _set_timm_transformer_dropout(model, cfg.mobilevit.dropout, cfg.mobilevit.attn_dropout, cfg.mobilevit.ffn_dropout)
    if _params(model) != our_params:
        return name, None, f"note: timm {name} has {_params(model):,} parameters, ours {our_params:,}: not compared"
    dropouts = (f"transformer dropout {cfg.mobilevit.dropout}, attention {cfg.mobilevit.attn_dropout}, "
                f"ffn {cfg.mobilevit.ffn_dropout}, " if cfg.name == "mobilevit" else "")
    return name, model, f"timm twin: {name} ({dropouts}classifier dropout {cfg.classifier_dropout}, as ours)"


def _timm_name(cfg: ModelConfig) -> Tuple[Optional[str], str]:
    if cfg.name == "mobilevit":
        from cvnets.mobilevit import VARIANTS

        knobs, variant = cfg.mobilevit, VARIANTS[cfg.mobilevit.mode]
        removed = variant.remove_layers if knobs.remove_layers is None else knobs.remove_layers
        fusion = variant.fusion if knobs.fusion is None else knobs.fusion
        if removed or fusion != "concat_conv" or knobs.mode not in TIMM_MOBILEVIT:
            return None, ("timm's MobileViTs keep all layers and the concat-conv fusion; MobileViT-Tiny and the "
                          "layer-removal / fusion ablations exist only here")
        if knobs.num_heads != 4:
            return None, f"timm's MobileViTs have 4 attention heads, this one {knobs.num_heads}"
        return TIMM_MOBILEVIT[knobs.mode], ""
    if cfg.name == "resnet":
        if cfg.resnet.stem != "imagenet":
            return None, (f"timm's resnet{cfg.resnet.depth} has the 7x7 + max-pool stem, this one the "
                          f"{cfg.resnet.stem} stem; compare with --model.resnet.stem imagenet")
        return TIMM_RESNET[cfg.resnet.depth], ""
    return None, f"no timm counterpart is known for model.name {cfg.name!r}"


def _set_timm_transformer_dropout(model, dropout: float, attn_dropout: float, ffn_dropout: float) -> None:
    """Give timm's transformer blocks our dropouts: after attention and after the FFN (`dropout`),
    on the attention weights and between the FFN's linears. timm's single `drop` setting would
    also put one between the FFN's linears, where ours has ffn_dropout (0 in the paper)."""
    for block in model.modules():
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None:
            continue
        attn.attn_drop.p, attn.proj_drop.p = attn_dropout, dropout
        mlp.drop1.p, mlp.drop2.p = ffn_dropout, dropout


def _add_timm_ratio(rows: List[Dict[str, Any]], seconds: Dict[Tuple[str, str], List[float]]) -> None:
    """ours/timm speed on our rows: the median over repeats of the ratio within each repeat,
    where both ran back to back, which a noisy machine disturbs far less than either median."""
    for row in rows:
        twin = next((label for label, mode in seconds if label != "ours" and mode == row["mode"]), None)
        if row["model"] == "ours" and twin is not None:
            pairs = zip(seconds[(twin, row["mode"])], seconds[("ours", row["mode"])])
            row["vs_timm"] = statistics.median(theirs / ours for theirs, ours in pairs)


class StepRunner:
    """One model's training step and eval forward on a fixed random batch, as the engine runs them."""

    def __init__(self, model, cfg: Config, device, dtype: str, memory_format: str, compile: bool,
                 batch: int, size: int, num_classes: int, fold_eval: bool = False) -> None:
        """fold_eval: evaluate a BatchNorm-folded copy, as the engine evaluates its own models
        (only for this project's models: folding knows their conv -> norm pairs)."""
        import torch

        import loss_fn
        import optim
        from cvnets.fuse import fold_batchnorm
        from engine.loops import AUTOCAST_DTYPES

        fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        self.model = model.to(device=device, memory_format=fmt)
        self.module = torch.compile(self.model) if compile else self.model
        self.eval_module = self.module
        if fold_eval:
            folded = fold_batchnorm(self.model)[0]
            self.eval_module = torch.compile(folded) if compile else folded
        self.optimizer = optim.build_optimizer(self.model, cfg.optim)
        self.criterion = loss_fn.build_loss(cfg.loss).to(device)
        self.dtype = AUTOCAST_DTYPES[{"fp32": "none"}.get(dtype, dtype)]
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        self.labels = torch.randint(0, num_classes, (batch,), device=device)
        self.device = device
        self._peak: Dict[str, Optional[float]] = {}

    def step(self, mode: str) -> None:
        self.train_step() if mode == "train" else self.eval_step()

    def train_step(self) -> None:
        self.module.train()
        with self._autocast():
            loss = self.criterion(self.module(self.images), self.labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_step(self) -> None:
        import torch

        self.eval_module.eval()
        with torch.inference_mode(), self._autocast():
            self.eval_module(self.images)

    def _autocast(self):
        import contextlib

        import torch

        return torch.autocast(self.device.type, self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def measure_peak(self, mode: str) -> None:
        """Record the peak memory of one step of `mode` (after warm-up, before timing)."""
        self._peak[mode] = peak_memory_mib(lambda: self.step(mode), self.device)

    def peak_mib(self, mode: str) -> Optional[float]:
        return self._peak.get(mode)


def _interleaved_seconds(runners: Dict[str, StepRunner], modes: Sequence[str], warmup: int, repeats: int,
                         steps: int, device) -> Dict[Tuple[str, str], List[float]]:
    """Seconds per run of `steps` steps for every (model, mode), `repeats` runs each.

    The models and modes take turns within every repeat, so a slow patch of a shared machine
    hits all of them alike instead of one whole measurement; the models' order alternates
    between repeats, so that neither always runs first.
    """
    for runner in runners.values():
        for mode in modes:
            for _ in range(warmup):
                runner.step(mode)
            runner.measure_peak(mode)
    seconds: Dict[Tuple[str, str], List[float]] = {(label, mode): [] for label in runners for mode in modes}
    labels = list(runners)
    for repeat in range(repeats):
        for label in labels if repeat % 2 == 0 else labels[::-1]:
            runner = runners[label]
            for mode in modes:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    runner.step(mode)
                synchronize(device)
                seconds[(label, mode)].append(time.perf_counter() - start)
    return seconds


def peak_memory_mib(step: Callable[[], None], device) -> Optional[float]:
    """Peak memory of one call of step(): CUDA's max allocated; on Linux CPUs the growth of the
    peak resident set size (activations and temporaries; the weights are resident already);
    None where neither can be read."""
    import torch

    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        _release_free_heap()  # else memory freed by an earlier model would hide this one's growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = _proc_status_kib("VmRSS")
        step()
        return (_proc_status_kib("VmHWM") - before) / 1024
    except (OSError, ValueError):
        return None


def _release_free_heap() -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "malloc_trim"):  # glibc
        libc.malloc_trim(0)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"{field} not in /proc/self/status")


# ----------------------------------------------------------------------------- epoch
EPOCH_COLUMNS: List[Column] = [
    ("cache", "data", "s"),
    ("workers", "workers", "d"),
    ("setup_s", "setup s", ".1f"),
    ("images", "images/epoch", ",d"),
    ("images_per_s", "train images/s", ",.1f"),
    ("epoch_s", "epoch s", ".1f"),
    ("speedup", "vs jpeg", ".2f"),
]
# variant -> (dataset.cache, dataset.augment_on): JPEG decoding, the decoded caches with the
# batch augmentation on the workers, and the decoded split held and augmented on the device.
VARIANTS = {"none": ("none", "workers"), "memory": ("memory", "workers"), "disk": ("disk", "workers"),
            "device": ("memory", "device")}


def bench_epoch(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """End-to-end training images/second of the Trainer, per data variant, vs JPEG decoding."""
    import logging
    import tempfile

    import torch

    from engine.build import build_trainer, run_dir_for, setup_process
    from engine.run_folder import RunFolder, read_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = base_config(args.config, args.overrides)
    logger = logging.getLogger("cvnets")
    with tempfile.TemporaryDirectory() as results:
        process = setup_process(_epoch_config(cfg, args, "none", results))
        if "device" in args.caches and process.device.type == "cpu":
            print("note: on the CPU the 'device' variant runs the batch augmentation in the training process, "
                  "with no workers; on a GPU it runs on the GPU")
        trainers, folders, setup = {}, {}, {}
        for variant in args.caches:
            run_cfg = _epoch_config(cfg, args, variant, results)
            start = time.perf_counter()
            trainers[variant] = build_trainer(run_cfg, process)
            folders[variant] = RunFolder(run_dir_for(run_cfg)).open(logger)
            setup[variant] = time.perf_counter() - start
        epochs: Dict[str, List[Dict[str, Any]]] = {variant: [] for variant in args.caches}
        for epoch in range(args.repeats):  # one epoch of every variant in turn
            for variant, trainer in trainers.items():
                trainer.run(folders[variant], stop_after_epoch=epoch + 1)
                epochs[variant].append(read_metrics(folders[variant].path)[-1])
        for folder in folders.values():
            folder.close(logger)
        del trainers  # ends their loader workers while the folder still exists
    label = os.path.splitext(os.path.basename(args.config or "defaults"))[0]
    print(f"{label}: {cfg.model.name} on {args.dataset_root}, {process.device.type}, {torch.get_num_threads()} "
          f"threads; median of {args.repeats} epoch(s) per variant, variants interleaved")
    rows = [{"cache": variant, "workers": 0 if variant == "device" else cfg.dataset.workers, "setup_s": setup[variant],
             "images": runs[-1]["train_images"],
             "images_per_s": statistics.median(r["images_per_second"] for r in runs),
             "epoch_s": statistics.median(r["epoch_seconds"] for r in runs), "device": process.device.type}
            for variant, runs in epochs.items()]
    jpeg = next((r["images_per_s"] for r in rows if r["cache"] == "none"), None)
    for row in rows:
        row["speedup"] = row["images_per_s"] / jpeg if jpeg else None
    return rows


def _epoch_config(cfg: Config, args: argparse.Namespace, variant: str, results: str) -> Config:
    cache, placement = VARIANTS[variant]
    changes = {"dataset.root": args.dataset_root, "dataset.cache": cache, "dataset.augment_on": placement,
               "common.device": args.device, "common.results_loc": results, "common.run_label": f"epoch-{variant}",
               "common.resume": "auto", "scheduler.max_epochs": max(cfg.scheduler.max_epochs, args.repeats),
               "common.max_batches_per_epoch": args.max_batches, "common.tensorboard": False}
    if args.workers is not None:
        changes["dataset.workers"] = args.workers
    return override(cfg, changes)


# ----------------------------------------------------------------------------- command line
def _add_data(sub) -> None:
    p = sub.add_parser("data", help=bench_data.__doc__)
    p.add_argument("--dataset-root", required=True, help="a TinyImageNet-layout tree (python -m data.fake ...)")
    p.add_argument("--config", help="YAML config whose augmentations and sampler to use (default: defaults)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batches", type=int, default=30, help="batches timed per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per source; the best counts")
    p.add_argument("--caches", type=lambda s: s.split(","), default=["none", "memory", "disk"],
                   help="sources to time, of none (JPEG), memory, disk, device (memory, augmented in-process)")
    p.add_argument("--threads", type=int, help="torch threads of the main process (default: torch's)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=bench_data, columns=DATA_COLUMNS)


def _add_latency(sub) -> None:
    p = sub.add_parser("latency", help=bench_latency.__doc__)
    p.add_argument("--common.config-file", "--config", dest="config",
                   help="YAML config of the model (default: defaults; with --checkpoint: its stored config)")
    p.add_argument("--checkpoint", help="trained weights (default: random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="batch sizes to time")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--runtimes", type=lambda s: s.split(","), default=list(RUNTIMES),
                   help=f"comma-separated, of {', '.join(RUNTIMES)}")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=bench_latency, columns=LATENCY_COLUMNS)


def _add_model(sub) -> None:
    p = sub.add_parser("model", help=bench_model.__doc__)
    p.add_argument("--common.config-file", "--config", dest="config", help="YAML config of the model (default: defaults)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    p.add_argument("--image-size", type=positive_int, help="input height and width (default: sampler.crop_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="fp32, or autocast to bf16 / fp16 (CUDA)")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS,
                   help="model and input layout (default: common.channels_last of the config)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (compiled during warm-up)")
    p.add_argument("--modes", type=comma_list(MODES), default=list(MODES), help="train, eval or both")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per model and mode")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per model and mode; the median counts")
    p.add_argument("--steps", type=positive_int, default=3, help="steps per timed run")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compare-timm", action="store_true", help=f"also time timm's identical model ({BENCH_EXTRA})")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=bench_model, columns=MODEL_COLUMNS, takes_overrides=True)


def _add_epoch(sub) -> None:
    p = sub.add_parser("epoch", help=bench_epoch.__doc__)
    p.add_argument("--dataset-root", required=True, help="a TinyImageNet-layout tree (python -m data.fake ...)")
    p.add_argument("--common.config-file", "--config", dest="config", help="YAML config to train (default: defaults)")
    p.add_argument("--caches", type=comma_list(list(VARIANTS)), default=["none", "memory"],
                   help="data variants, of none (JPEG decoding), memory, disk (decoded caches, augmented on the "
                   "workers), device (decoded split held and augmented on the training device)")
    p.add_argument("--repeats", type=positive_int, default=1, help="epochs per variant; the median counts")
    p.add_argument("--max-batches", type=positive_int, help="batches per epoch (default: the whole split)")
    p.add_argument("--workers", type=non_negative_int, help="DataLoader workers (default: the config's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=bench_epoch, columns=EPOCH_COLUMNS, takes_overrides=True)


SUBCOMMANDS: List[Callable] = [_add_data, _add_latency, _add_model, _add_epoch]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    # `model` and `epoch` pass what they do not know on as config overrides (--section.key value).
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        if getattr(args, "print_config", False):
            print(to_yaml(base_config(args.config, overrides)), end="")
            return
        rows = args.run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print_table(rows, args.columns)
    write_json(args.json, {"command": args.command, "cpu_count": os.cpu_count(), "rows": rows})


if __name__ == "__main__":
    main()
