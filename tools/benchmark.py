"""Throughput benchmarks, one subcommand each (python -m tools.benchmark COMMAND --help).

    data      training-loader images/s: JPEG decoding vs the decoded caches vs the device placement
    latency   one CPU forward pass: eager PyTorch vs the TorchScript and ONNX Runtime exports
    model     training steps and eval forwards on a fixed batch, through the engine's loops
    epoch     real Trainer epochs per data variant, against JPEG decoding
    estimate  minutes of a whole run: one real epoch scaled to TinyImageNet's splits
    gpu       model (every model config, two batch sizes), epoch and estimate in one go, one JSON
    distill   does distillation help? a student alone vs distilled from a trained teacher, on a sample

Every command takes --common.config-file (or --config) and --json OUT; all but latency take config
overrides (--dataset.root DIR, --section.key value). Whether the GPU paths compute the right thing
is a test question: pytest -m cuda. docs/performance.md says what each figure means.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from engine import timing
from engine.experiments import NUM_CLASSES  # TinyImageNet's: when neither a checkpoint nor model.num_classes says
from options.config import ConfigError, load_config, override, to_yaml
from options.schema import Config, ModelConfig
from utils.files import write_json

Row = Dict[str, Any]
Column = Tuple[str, str, str]  # (row key, header, format spec)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_EXTRA = "pip install -e '.[bench]' (or pip install timm)"
MODEL_CONFIGS = tuple(f"mobilevit_{m}.yaml" for m in ("xx_small", "x_small", "small", "tiny")) + tuple(
    f"resnet{d}.yaml" for d in (18, 34, 50))
# variant -> (dataset.cache, dataset.augment_on): JPEG decoding, the decoded caches with the batch
# augmentation on the workers, and the decoded split held and augmented on the training device.
VARIANTS = {"none": ("none", "workers"), "memory": ("memory", "workers"), "disk": ("disk", "workers"),
            "device": ("memory", "device")}


# ----------------------------------------------------------------------------- shared helpers
def print_table(rows: Sequence[Row], columns: Sequence[Column]) -> None:
    """Rows as an aligned text table; a missing value prints as '-'."""
    cells = [[h for _, h, _ in columns]]
    cells += [[format(r[k], spec) if r.get(k) is not None else "-" for k, _, spec in columns] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def base_config(config_file: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """The config file's settings (defaults without one), then dotted command-line overrides."""
    return load_config((["--common.config-file", config_file] if config_file else []) + list(overrides))


def stem(path: Optional[str]) -> str:
    return os.path.splitext(os.path.basename(path or "defaults"))[0]


def config_path(name: str) -> str:
    """A path as given, else a file of config/ (`mobilevit_tiny.yaml`)."""
    return name if os.path.exists(name) else os.path.join(REPO, "config", name)


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return int(text)
    return parse


positive_int, non_negative_int = at_least(1), at_least(0)


def comma_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """argparse type: a comma-separated subset of `choices`."""
    def parse(text: str) -> List[str]:
        items = [item for item in text.split(",") if item]
        if not items or any(item not in choices for item in items):
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)} (comma-separated)")
        return items
    return parse


def device_for(name: str, dtype: str = "fp32"):
    from engine.utils import resolve_device

    device = resolve_device(name)
    if dtype == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs CUDA (it trains with a gradient scaler); use bf16 or fp32 on the CPU")
    return device


def variant_config(cfg: Config, variant: str, changes: Optional[Dict[str, Any]] = None) -> Config:
    cache, placement = VARIANTS[variant]
    return override(cfg, {"dataset.cache": cache, "dataset.augment_on": placement, **(changes or {})})


def add_speedup(rows: List[Row], key: str) -> List[Row]:
    """Each row's images/s as a ratio to the JPEG-decoding row's (variant 'none'), where there is one."""
    jpeg = next((r["images_per_s"] for r in rows if r[key] == "none"), None)
    for row in rows:
        row["speedup"] = row["images_per_s"] / jpeg if jpeg else None
    return rows


# ----------------------------------------------------------------------------- data
DATA_COLUMNS: List[Column] = [("cache", "data", "s"), ("workers", "workers", "d"), ("setup_s", "setup s", ".1f"),
                              ("images", "images", "d"), ("images_per_s", "images/s", ",.0f"),
                              ("speedup", "vs jpeg", ".1f"), ("cpu_us_per_image", "cpu us/img", ".0f")]


def bench_data(args: argparse.Namespace) -> List[Row]:
    """Training-loader images/second: JPEG decoding vs the decoded caches vs the device placement."""
    from data import build_loaders

    device, rows = device_for(args.device), []
    for variant in args.caches:
        cfg = variant_config(args.cfg, variant, {"dataset.persistent_workers": True})
        start = time.perf_counter()
        loader = build_loaders(cfg, device=device).train
        setup = time.perf_counter() - start
        best = max((timing.loader_throughput(loader, args.batches, device) for _ in range(args.repeats)),
                   key=lambda timing: timing["images_per_s"])
        workers = 0 if variant == "device" else cfg.dataset.workers
        rows.append({"cache": variant, "workers": workers, "setup_s": setup, **best})
        del loader  # ends its workers before the next variant starts
    return add_speedup(rows, "cache")


# ----------------------------------------------------------------------------- latency
LATENCY_COLUMNS: List[Column] = [("model", "model", "s"), ("runtime", "runtime", "s"), ("batch", "batch", "d"),
                                 ("threads", "threads", "d"), ("median_ms", "median ms", ".2f"),
                                 ("p90_ms", "p90 ms", ".2f"), ("min_ms", "min ms", ".2f"),
                                 ("images_per_s", "images/s", ",.0f")]


def bench_latency(args: argparse.Namespace) -> List[Row]:
    """CPU latency of one forward pass: eager PyTorch vs the TorchScript and ONNX Runtime exports
    main_export.py writes (BatchNorm folded); median and p90 over the repeats."""
    import numpy as np
    import torch

    from engine.export import input_size

    model, cfg = _latency_model(args.config, args.checkpoint)
    size = input_size(cfg)
    label = stem(args.config) if args.config or not args.checkpoint else \
        os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    print(f"{label}: {cfg.model.name}, input {size}x{size}, {args.threads} threads, "
          f"{args.warmup} warm-up + {args.repeats} timed calls per row")
    rows = []
    runners, notes = timing.export_runners(model, size, args.runtimes, args.threads)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for batch in args.batch_sizes:
        images = torch.rand(batch, 3, size, size)
        for runtime, times in timing.interleaved_latencies(runners, images, args.warmup, args.repeats).items():
            median, p90 = np.percentile(times, [50, 90])
            rows.append({"model": label, "runtime": runtime, "batch": batch, "threads": args.threads,
                         "median_ms": 1e3 * median, "p90_ms": 1e3 * p90, "min_ms": 1e3 * min(times),
                         "images_per_s": batch / median})
    return rows


def _latency_model(config: Optional[str], checkpoint: Optional[str]):
    """(eval-mode model, its config): the checkpoint's weights and stored config, or random weights
    (which do not change the work done)."""
    import cvnets
    from engine import checkpoint as ckpt
    from engine.evaluation import trained_model

    if checkpoint:
        state = ckpt.load(checkpoint)
        cfg = load_config(["--common.config-file", config] if config else [], base=state["config"])
        return trained_model(cfg, state, use_ema=False, flag="--eval.ema"), cfg
    cfg = base_config(config)
    return cvnets.build_model(cfg.model, NUM_CLASSES).eval(), cfg


# ----------------------------------------------------------------------------- model
MODEL_COLUMNS: List[Column] = [("model", "model", "s"), ("mode", "mode", "s"), ("batch", "batch", "d"),
                               ("images_per_s", "images/s", ",.1f"), ("ms_per_step", "ms/step", ",.1f"),
                               ("spread", "spread", ".0%"), ("peak_mib", "peak MiB", ",.0f"),
                               ("vs_timm", "ours/timm", ".2f")]
MODES = ("train", "eval")
TIMM_MOBILEVIT = {"xx_small": "mobilevit_xxs", "x_small": "mobilevit_xs", "small": "mobilevit_s"}


def model_rows(runners: Dict[str, timing.StepRunner], args: argparse.Namespace, batch: int, on,
               **settings: Any) -> List[Row]:
    """Rows of (runner, mode): images/s of the median timed run, peak memory, ours/timm."""
    seconds = timing.interleaved_seconds(runners, args.modes, args.warmup, args.repeats, args.steps, on)
    rows = []
    for (label, mode), times in seconds.items():
        median, images = statistics.median(times), batch * args.steps
        rows.append({"model": label, "mode": mode, "batch": batch, "images_per_s": images / median,
                     "best_images_per_s": images / min(times), "ms_per_step": 1e3 * median / args.steps,
                     "spread": (max(times) - min(times)) / median, "peak_mib": runners[label].peak_mib[mode],
                     "params": sum(p.numel() for p in runners[label].model.parameters()), "run_seconds": times,
                     "device": on.type, **settings})
    for row in rows:  # ours/timm: the median of the per-repeat ratios, each of two back-to-back runs
        twin = next((label for label, mode in seconds if label != row["model"] and mode == row["mode"]), None)
        if row["model"] == "ours" and twin is not None:
            pairs = zip(seconds[(twin, row["mode"])], seconds[("ours", row["mode"])])
            row["vs_timm"] = statistics.median(theirs / ours for theirs, ours in pairs)
    return rows


def bench_model(args: argparse.Namespace) -> List[Row]:
    """Training-step and eval images/second and peak memory of the config's model on a fixed random
    batch (median of --repeats runs of --steps steps), optionally against timm's identical model."""
    import torch

    import cvnets

    device, cfg = device_for(args.device, args.dtype), args.cfg
    if args.compare_timm:
        _import_timm()  # fail before building anything
    channels_last = cfg.common.channels_last if args.memory_format is None else args.memory_format == "channels_last"
    num_classes = cfg.model.num_classes or NUM_CLASSES
    size = args.image_size or cfg.sampler.crop_size
    models = {"ours": cvnets.build_model(cfg.model, num_classes)}
    if args.compare_timm:
        name, twin, note = timm_twin(cfg.model, num_classes, sum(p.numel() for p in models["ours"].parameters()))
        print(note)
        if twin is not None:
            models[f"timm {name}"] = twin
    runners = {label: timing.StepRunner(model, cfg, device, args.dtype, channels_last, args.compile, args.batch_size,
                                        size, num_classes, fold_eval=label == "ours")
               for label, model in models.items()}
    layout = "channels_last" if channels_last else "contiguous"
    print(f"{stem(args.config)}: {cfg.model.name}, batch {args.batch_size} at {size}x{size}, {device.type}, "
          f"{args.dtype}, {layout}, {torch.get_num_threads()} threads{', compiled' if args.compile else ''}; "
          f"{args.warmup} warm-up + median of {args.repeats} x {args.steps} steps; peak memory: "
          f"{'max allocated' if device.type == 'cuda' else 'growth of the peak RSS during one step'}")
    return model_rows(runners, args, args.batch_size, device, dtype=args.dtype,
                      memory_format=layout, image_size=size, compile=args.compile)


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"--compare-timm needs timm, which the bench extra installs: {BENCH_EXTRA}") from None
    return timm


def timm_twin(cfg: ModelConfig, num_classes: int, our_params: int):
    """(timm name, model or None, a note saying what is compared or why nothing is).

    Only an architecturally identical model counts: the same layers and, as a check, the same
    parameter count; its dropouts are set to ours, so that both do the same work."""
    name, why_not = _timm_name(cfg)
    if name is None:
        return None, None, f"note: no timm twin for this model: {why_not}"
    model = _import_timm().create_model(name, num_classes=num_classes, drop_rate=cfg.classifier_dropout)
    if cfg.name == "mobilevit":
        knobs = cfg.mobilevit
        # timm's single `drop` would also sit between the FFN's linears, where ours has ffn_dropout
        for block in (m for m in model.modules() if hasattr(m, "attn") and hasattr(m, "mlp")):
            block.attn.attn_drop.p, block.attn.proj_drop.p = knobs.attn_dropout, knobs.dropout
            block.mlp.drop1.p, block.mlp.drop2.p = knobs.ffn_dropout, knobs.dropout
    theirs = sum(p.numel() for p in model.parameters())
    if theirs != our_params:
        return name, None, f"note: timm {name} has {theirs:,} parameters, ours {our_params:,}: not compared"
    dropouts = (f"transformer dropout {cfg.mobilevit.dropout}, attention {cfg.mobilevit.attn_dropout}, "
                f"ffn {cfg.mobilevit.ffn_dropout}, " if cfg.name == "mobilevit" else "")
    return name, model, f"timm twin: {name} ({dropouts}classifier dropout {cfg.classifier_dropout}, as ours)"


def _timm_name(cfg: ModelConfig) -> Tuple[Optional[str], str]:
    if cfg.name == "mobilevit":
        from cvnets.mobilevit import VARIANTS as MOBILEVITS

        knobs, variant = cfg.mobilevit, MOBILEVITS[cfg.mobilevit.mode]
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
        return f"resnet{cfg.resnet.depth}", ""
    return None, f"no timm counterpart is known for model.name {cfg.name!r}"


# ----------------------------------------------------------------------------- epoch and estimate
EPOCH_COLUMNS: List[Column] = [("cache", "data", "s"), ("workers", "workers", "d"), ("setup_s", "setup s", ".1f"),
                               ("images", "images/epoch", ",d"), ("images_per_s", "train images/s", ",.1f"),
                               ("epoch_s", "epoch s", ".1f"), ("speedup", "vs jpeg", ".2f"),
                               ("vs_model_only", "vs model-only", ".2f")]
ESTIMATE_COLUMNS: List[Column] = [("config", "config", "s"), ("epochs", "epochs", "d"),
                                  ("images_per_s", "train images/s", ",.1f"), ("epoch_s", "s/epoch", ",.1f"),
                                  ("minutes", "minutes/run", ",.1f")]


def epoch_row(label: str, cfg: Config, run: Row) -> Row:
    """The last epoch's figures (the first also starts workers and picks kernels)."""
    last = run["epochs"][-1]
    workers = 0 if cfg.dataset.augment_on == "device" else cfg.dataset.workers
    return {"cache": label, "workers": workers, "setup_s": run["setup_s"], "images": last["train_images"],
            "images_per_s": last["images_per_second"], "epoch_s": last["epoch_seconds"], "device": run["device"],
            "batch": cfg.dataset.train_batch_size, "epochs": run["epochs"]}


def estimate_row(label: str, max_epochs: int, run: Row) -> Row:
    """Minutes of `max_epochs` epochs on TinyImageNet from the last measured epoch: training at its
    images/second over 100,000 images, the rest of the epoch (validation of the model and its EMA,
    checkpoints) scaled from its validation images to 10,000."""
    last = run["epochs"][-1]
    epoch_s = timing.run_epoch_seconds(last)
    return {"config": label, "epochs": max_epochs, "images_per_s": last["images_per_second"], "epoch_s": epoch_s,
            "minutes": max_epochs * epoch_s / 60, "measured_train_images": last["train_images"],
            "device": run["device"]}


def _run_changes(args: argparse.Namespace) -> Dict[str, Any]:
    return {"common.device": args.device, "common.max_batches_per_epoch": args.max_batches}


def bench_epoch(args: argparse.Namespace) -> List[Row]:
    """End-to-end training images/second of the Trainer per data variant, against JPEG decoding:
    the same model and augmentations, only where the pixels come from and where they are augmented
    differ."""
    cfgs = {variant: variant_config(args.cfg, variant, _run_changes(args)) for variant in args.caches}
    runs = timing.train_epochs(cfgs, args.repeats)
    if "device" in args.caches and runs["device"]["device"] == "cpu":
        print("note: on the CPU the 'device' variant runs the batch augmentation in the training process, "
              "with no workers; on a GPU it runs on the GPU")
    return add_speedup([epoch_row(variant, cfgs[variant], run) for variant, run in runs.items()], "cache")


def bench_estimate(args: argparse.Namespace) -> List[Row]:
    """Minutes of a whole run of the config (scheduler.max_epochs epochs on TinyImageNet's splits),
    from real epochs through the Trainer with the config's own data settings."""
    run = timing.train_epochs({stem(args.config): override(args.cfg, _run_changes(args))}, args.repeats)
    return [estimate_row(stem(args.config), args.cfg.scheduler.max_epochs, run[stem(args.config)])]


# ----------------------------------------------------------------------------- distillation
DISTILL_COLUMNS: List[Column] = [("run", "run", "s"), ("epochs", "epochs", "d"), ("val_loss", "val loss", ".3f"),
                                 ("val_top1", "val top-1", ".2f")]
# 40 classes make the generated sample hard enough that a few epochs leave the student well
# short of a teacher trained for many more.
DISTILL_SAMPLE = dict(classes=40, train_per_class=25, val_per_class=20, test_per_class=0, seed=0)
DISTILL_RECIPE = ("--dataset.fake.enable", "false", "--dataset.workers", "0", "--common.resume", "null",
                  "--sampler.crop-size", "32", "--image-augmentation.val",
                  "[{name: resize, size: 36}, {name: center_crop, size: 32}]", "--dataset.train-batch-size", "32",
                  "--dataset.val-batch-size", "100", "--common.log-every-batches", "100", "--ema.enable", "false",
                  "--scheduler.warmup-iterations", "10")


def bench_distill(args: argparse.Namespace) -> List[Row]:
    """Does distillation help here? On a generated 40-class sample at 32 px (the config's recipe,
    quickstart by default): a MobileViT-XS teacher trains for --teacher-epochs, then the config's
    model trains for --epochs twice with the same seed, alone and distilled from the teacher
    (soft, T 4, alpha 0.5). Prints each run's last val loss and top-1. 3 to 7 minutes on 2 CPU cores."""
    from data.fake import make_fake_tinyimagenet
    from engine.commands import train
    from engine.run_folder import read_metrics

    config = args.config or config_path("quickstart.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_fake_tinyimagenet(os.path.join(tmp, "tiny-imagenet-200"), **DISTILL_SAMPLE)
        common = ["--common.config-file", config, *args.overrides, *DISTILL_RECIPE, "--dataset.root", root,
                  "--common.results-loc", tmp, "--common.device", args.device]
        runs = {
            "teacher": ["--model.name", "mobilevit", "--model.mobilevit.mode", "x_small",
                        "--scheduler.max-epochs", str(args.teacher_epochs)],
            "student alone": ["--scheduler.max-epochs", str(args.epochs)],
            "student distilled": ["--scheduler.max-epochs", str(args.epochs), "--loss.name", "distillation",
                                  "--loss.distillation.teacher", os.path.join(tmp, "teacher", "checkpoint_best.pt"),
                                  "--loss.distillation.temperature", "4", "--loss.distillation.alpha", "0.5"],
        }
        rows = []
        for name, flags in runs.items():
            label = name.replace(" ", "_")
            if train([*common, *flags, "--common.run-label", label]) != 0:
                raise RuntimeError(f"the {name} run failed; its log is above")
            last = read_metrics(os.path.join(tmp, label))[-1]
            rows.append({"run": name, "epochs": last["epoch"], "val_loss": last["val_loss"],
                         "val_top1": last["val_top1"]})
    alone, distilled = rows[1]["val_loss"], rows[2]["val_loss"]
    print(f"distilled student's val loss {'below' if distilled < alone else 'NOT below'} the student alone's "
          f"({distilled:.3f} vs {alone:.3f})")
    return rows


# ----------------------------------------------------------------------------- gpu: all of it
def bench_gpu(args: argparse.Namespace) -> Dict[str, List[Row]]:
    """Model-only throughput of every model config at each batch size (bf16 + channels_last on
    CUDA, fp32 on the CPU), MobileViT-Tiny's epochs per data variant against its model-only
    figure, and the minutes of a MobileViT-Tiny and a ResNet-50 run: one JSON."""
    import torch

    import cvnets

    device = device_for(args.device)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    if not args.generate and not os.path.isdir(args.cfg.dataset.root):  # before minutes of model timings
        raise ConfigError(f"dataset.root: {args.cfg.dataset.root} is not a folder; give --dataset.root DIR, "
                          "or --generate 100000 for a generated tree")
    with tempfile.TemporaryDirectory() as folder:
        root = _generated_tree(args.generate, folder) if args.generate else args.cfg.dataset.root
        sections: Dict[str, List[Row]] = {"model": [], "epoch": [], "estimate": []}
        for name in args.models:
            cfg = override(base_config(config_path(name), args.overrides), {"common.channels_last": True})
            for batch in args.batch_sizes:
                if args.compile:
                    torch._dynamo.reset()  # one model's compiles must not use up another's recompile limit
                model = cvnets.build_model(cfg.model, NUM_CLASSES)
                runner = timing.StepRunner(model, cfg, device, dtype, True, args.compile, batch, cfg.sampler.crop_size,
                                           NUM_CLASSES, fold_eval=True)
                sections["model"] += model_rows({stem(name): runner}, args, batch, device, dtype=dtype,
                                                compile=args.compile)
                del runner, model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        fast = {"dataset.root": root, "common.mixed_precision": timing.DTYPES[dtype], "common.channels_last": True,
                **_run_changes(args)}
        tiny = override(base_config(config_path(args.epoch_config), args.overrides),
                        {**fast, "dataset.train_batch_size": args.batch_sizes[0]})
        cfgs = {variant: variant_config(tiny, variant) for variant in args.caches}
        runs = timing.train_epochs(cfgs, args.epochs)
        for variant, run in runs.items():
            row = epoch_row(variant, cfgs[variant], run)
            model_only = next((r for r in sections["model"] if r["model"] == stem(args.epoch_config)
                               and r["mode"] == "train" and r["batch"] == row["batch"]), None)
            row["vs_model_only"] = row["images_per_s"] / model_only["images_per_s"] if model_only else None
            sections["epoch"].append(row)
        sections["epoch"] = add_speedup(sections["epoch"], "cache")
        fastest = max(sections["epoch"], key=lambda r: r["images_per_s"])
        sections["estimate"].append(estimate_row(stem(args.epoch_config), tiny.scheduler.max_epochs,
                                                 runs[fastest["cache"]]))
        for name in args.estimate_configs:  # each with its own recipe, in the fastest data variant
            cfg = variant_config(base_config(config_path(name), args.overrides), fastest["cache"], fast)
            sections["estimate"].append(estimate_row(stem(name), cfg.scheduler.max_epochs,
                                                     timing.train_epochs({stem(name): cfg}, args.epochs)[stem(name)]))
    return sections


def _generated_tree(images: int, folder: str) -> str:
    """A generated TinyImageNet-shaped tree of about `images` training images (200 classes, a tenth
    as many validation images), written by several processes."""
    from data.fake import make_fake_tinyimagenet

    classes = min(200, images)
    per_class = images // classes
    start = time.perf_counter()
    root = make_fake_tinyimagenet(os.path.join(folder, "tree"), classes, per_class, max(1, per_class // 10),
                                  test_per_class=0, processes=min(8, os.cpu_count() or 1))
    print(f"wrote a {classes * per_class:,}-image tree in {time.perf_counter() - start:.0f}s")
    return root


# ----------------------------------------------------------------------------- command line
class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _command(sub, name: str, run: Callable, columns: Optional[List[Column]], overrides: bool = True):
    p = sub.add_parser(name, help=run.__doc__.split("\n\n")[0], description=run.__doc__)
    p.add_argument("--common.config-file", "--config", dest="config", help="YAML config (default: the defaults)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's; latency: 2)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json", help="also write the rows to this JSON file")
    if name != "latency":
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.set_defaults(run=run, columns=columns, takes_overrides=overrides)
    return p


def _timing(p) -> None:
    p.add_argument("--modes", type=comma_list(MODES), default=list(MODES), help="train, eval or both")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps per model and mode")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per model and mode; the median counts")
    p.add_argument("--steps", type=positive_int, default=3, help="steps per timed run")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (compiled during warm-up)")


def _epochs(p, caches: str, what: str = "variants") -> None:
    p.add_argument("--caches", type=comma_list(list(VARIANTS)), default=caches.split(","),
                   help=f"data {what}, of none (JPEG decoding), memory, disk (decoded caches, augmented on the "
                   "workers), device (decoded split held and augmented on the training device)")
    p.add_argument("--max-batches", type=positive_int, help="batches per epoch (default: the whole split)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="python -m tools.benchmark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "data", bench_data, DATA_COLUMNS)
    p.add_argument("--caches", type=comma_list(list(VARIANTS)), default=["none", "memory", "disk"],
                   help="sources to time, of none (JPEG), memory, disk, device (memory, augmented on the device)")
    p.add_argument("--batches", type=positive_int, default=30, help="batches timed per repeat")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per source; the fastest counts")

    p = _command(sub, "latency", bench_latency, LATENCY_COLUMNS, overrides=False)
    p.add_argument("--checkpoint", help="trained weights (default: random weights; with it: its stored config)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1], help="batch sizes to time")
    p.add_argument("--repeats", type=positive_int, default=50, help="timed calls per row")
    p.add_argument("--warmup", type=non_negative_int, default=10, help="untimed calls before timing")
    p.add_argument("--runtimes", type=comma_list(timing.RUNTIMES), default=list(timing.RUNTIMES),
                   help=", ".join(timing.RUNTIMES))
    p.set_defaults(threads=2)

    p = _command(sub, "model", bench_model, MODEL_COLUMNS)
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    p.add_argument("--image-size", type=positive_int, help="input height and width (default: sampler.crop_size)")
    p.add_argument("--dtype", choices=list(timing.DTYPES), default="fp32", help="fp32, or autocast to bf16 / fp16")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"),
                   help="model and input layout (default: common.channels_last of the config)")
    p.add_argument("--compare-timm", action="store_true", help=f"also time timm's identical model ({BENCH_EXTRA})")
    _timing(p)

    p = _command(sub, "epoch", bench_epoch, EPOCH_COLUMNS)
    _epochs(p, "none,memory")
    p.add_argument("--repeats", type=positive_int, default=1, help="epochs per variant; the last counts")

    p = _command(sub, "estimate", bench_estimate, ESTIMATE_COLUMNS)
    p.add_argument("--max-batches", type=positive_int, help="batches per measured epoch (default: the whole split)")
    p.add_argument("--repeats", type=positive_int, default=1, help="epochs measured; the last counts")

    p = _command(sub, "gpu", bench_gpu, None)
    p.add_argument("--generate", type=positive_int, metavar="N", help="benchmark on a generated tree of N "
                   "training images (100000: TinyImageNet's size) instead of dataset.root")
    p.add_argument("--models", type=comma_list(MODEL_CONFIGS), default=list(MODEL_CONFIGS),
                   help="model configs of config/ to time")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[128, 256],
                   help="model-only batch sizes; the first is also the end-to-end one")
    _timing(p)
    _epochs(p, "memory,device", "variants of the end-to-end epochs")
    p.add_argument("--epoch-config", default="mobilevit_tiny.yaml", help="the config of the end-to-end epochs")
    p.add_argument("--epochs", type=positive_int, default=2, help="epochs per run; the last counts")
    p.add_argument("--estimate-configs", nargs="*", default=["resnet50.yaml"],
                   help="configs whose whole run is estimated too, besides --epoch-config")

    p = _command(sub, "distill", bench_distill, DISTILL_COLUMNS)
    p.add_argument("--epochs", type=positive_int, default=3, help="epochs of each student run")
    p.add_argument("--teacher-epochs", type=positive_int, default=24, help="epochs of the teacher run")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    from cvnets.export import MissingExtraError
    from data.base import DatasetError
    from engine.checkpoint import CheckpointError

    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not args.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        args.cfg = base_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(args.cfg), end="")
            return
        if args.command != "latency":
            from engine.build import check_config

            check_config(args.cfg)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = args.run(args)
    except (ValueError, DatasetError, CheckpointError, MissingExtraError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    sections = result if isinstance(result, dict) else {args.command: result}
    columns = {"model": MODEL_COLUMNS, "epoch": EPOCH_COLUMNS, "estimate": ESTIMATE_COLUMNS}
    for name, rows in sections.items():
        if len(sections) > 1:
            print(f"\n{name}")
        shown = [c for c in args.columns or columns[name] if any(r.get(c[0]) is not None for r in rows)]
        print_table(rows, shown)
    if args.json:
        payload = {"command": args.command, "system": timing.system_info(), "argv": list(argv or sys.argv[1:])}
        write_json(args.json, {**payload, **({"rows": result} if isinstance(result, list) else result)})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
