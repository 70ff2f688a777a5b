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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from options.config import ConfigError, load_config, override  # noqa: E402
from options.schema import Config  # noqa: E402

Column = Tuple[str, str, str]  # (row key, header, format spec)


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
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def base_config(config_file: Optional[str]) -> Config:
    return load_config(["--common.config-file", config_file] if config_file else [])


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
_SOURCES = {"none": "jpeg", "memory": "memory", "disk": "disk"}


def bench_data(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Training-loader images/second reading JPEGs vs the decoded cache (memory, disk)."""
    import torch

    from data import build_loaders  # imported here so other subcommands do not pay for it

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = base_config(args.config)
    rows = []
    for cache in args.caches:
        run_cfg = override(cfg, {"dataset.root": args.dataset_root, "dataset.workers": args.workers,
                                 "dataset.cache": cache, "dataset.persistent_workers": True})
        start = time.perf_counter()
        loader = build_loaders(run_cfg).train
        setup = time.perf_counter() - start
        best = max(_images_per_second(loader, args.batches) for _ in range(args.repeats))
        rows.append({"cache": _SOURCES[cache], "workers": args.workers, "setup_s": setup,
                     "images": best.images, "images_per_s": best.images / best.wall_s,
                     # with workers the main process's CPU time misses theirs: only in-process is shown
                     "cpu_us_per_image": 1e6 * best.cpu_s / best.images if args.workers == 0 else None})
        del loader  # ends its workers before the next source starts
    jpeg = next((r["images_per_s"] for r in rows if r["cache"] == "jpeg"), None)
    for row in rows:
        row["speedup"] = row["images_per_s"] / jpeg if jpeg else None
    return rows


class Timing(NamedTuple):
    images_per_s: float  # first field: max() picks the fastest run
    images: int
    wall_s: float
    cpu_s: float  # of this process (all its threads)


def _images_per_second(loader, batches: int) -> Timing:
    """Throughput over `batches` batches after one warm-up batch (which starts the workers)."""
    batches_iter = _endless(loader)
    next(batches_iter)
    images, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        images += len(next(batches_iter)[0])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Timing(images / wall, images, wall, cpu)


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
    from main_export import input_size

    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        raise ConfigError(f"--runtimes: {', '.join(unknown)} unknown; choose from {', '.join(RUNTIMES)}")
    torch.set_num_threads(args.threads)
    model, cfg = _latency_model(args.config, args.checkpoint)
    size = input_size(cfg)
    label = os.path.splitext(os.path.basename(args.config or args.checkpoint or "defaults"))[0]
    print(f"{label}: {cfg.model.name}, input {size}x{size}, {args.threads} threads, "
          f"{args.warmup} warm-up + {args.repeats} timed calls per row")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        runners = _latency_runners(model, size, args.runtimes, args.threads, folder)
        for batch in args.batch_sizes:
            images = torch.rand(batch, 3, size, size)
            for runtime, run in runners.items():
                times = _latencies(run, images, args.warmup, args.repeats)
                median, p90 = np.percentile(times, [50, 90])
                rows.append({"model": label, "runtime": runtime, "batch": batch, "threads": args.threads,
                             "median_ms": 1e3 * median, "p90_ms": 1e3 * p90, "min_ms": 1e3 * min(times),
                             "images_per_s": batch / median})
    return rows


def _latency_model(config: Optional[str], checkpoint: Optional[str]):
    """(eval-mode model, its config): the checkpoint's weights and stored config, or random weights."""
    import cvnets
    from main_export import load_export_config, load_trained_model

    if checkpoint:
        argv = ["--model.checkpoint", checkpoint] + (["--common.config-file", config] if config else [])
        cfg, state = load_export_config(argv)
        return load_trained_model(cfg, state, use_ema=False), cfg
    cfg = base_config(config)
    return cvnets.build_model(cfg.model, RANDOM_WEIGHTS_CLASSES).eval(), cfg


def _latency_runners(model, size: int, runtimes: Sequence[str], threads: int, folder: str) -> Dict[str, Callable]:
    """runtime name -> callable on images; exports are written as main_export does (BN folded)."""
    import torch
    from cvnets.export import MissingExtraError, export_model, load_runner
    from cvnets.fuse import fold_batchnorm

    runners: Dict[str, Callable] = {"eager": model} if "eager" in runtimes else {}
    folded, _ = fold_batchnorm(model)
    example = torch.rand(1, 3, size, size)
    for runtime in (r for r in RUNTIMES if r in runtimes and r != "eager"):
        fmt = _RUNTIME_FORMATS[runtime]
        path = os.path.join(folder, f"model.{fmt}")
        try:
            # One artifact with a symbolic batch axis serves every --batch-sizes entry.
            export_model(folded, example, path, fmt, dynamic_batch=True)
            runners[runtime] = load_runner(path, fmt, threads)
        except MissingExtraError as e:
            print(f"note: {runtime} skipped: {e}", file=sys.stderr)
    return runners


def _latencies(run: Callable, images, warmup: int, repeats: int) -> List[float]:
    """Seconds per call of run(images), after `warmup` untimed calls (lazy init, allocator, JIT profiling)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            run(images)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(images)
            times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- command line
def _add_data(sub) -> None:
    p = sub.add_parser("data", help=bench_data.__doc__)
    p.add_argument("--dataset-root", required=True, help="a TinyImageNet-layout tree (python -m data.fake ...)")
    p.add_argument("--config", help="YAML config whose augmentations and sampler to use (default: defaults)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batches", type=int, default=30, help="batches timed per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per source; the best counts")
    p.add_argument("--caches", type=lambda s: s.split(","), default=["none", "memory", "disk"],
                   help="sources to time, of none (JPEG), memory, disk")
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
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=bench_latency, columns=LATENCY_COLUMNS)


SUBCOMMANDS: List[Callable] = [_add_data, _add_latency]  # later: model, epoch


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        rows = args.run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print_table(rows, args.columns)
    write_json(args.json, {"command": args.command, "cpu_count": os.cpu_count(), "rows": rows})


if __name__ == "__main__":
    main()
