"""Evaluate a checkpoint written by main_train.py.

    python main_eval.py --model.checkpoint results/RUN/checkpoint_best.pt [--eval.split val|test]
        [--common.config-file CONFIG] [--eval.ema true] [--eval.output-json PATH] [--eval.per-class true]

The model is rebuilt from the config stored in the checkpoint; a config file given as well
must describe the same model (its dataset and eval settings are used).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from options.cli import run_or_exit
from options.config import ConfigError, parse_flags, resolve, to_dict
from options.schema import Config

_NOT_ARCHITECTURE = ("checkpoint",)


def load_eval_config(argv: Sequence[str], prog: str = "main_eval", doc: str = __doc__) -> Tuple[Config, Dict[str, Any]]:
    """The resolved config (checkpoint's stored config < config file < flags) and the checkpoint.

    `prog` and `doc` name the entry point in --help and in errors (main_export shares this).
    """
    from engine.trainer import load_checkpoint
    from options.config import help_text

    flags, switches = parse_flags(argv)
    if "help" in switches:
        print(doc + "\n" + help_text(f"{prog}.py"))
        raise SystemExit(0)
    if switches:
        raise ConfigError(f"unknown switch --{switches[0]}; {prog} takes --help")
    if "model.checkpoint" not in flags:
        raise ConfigError(f"{prog} needs --model.checkpoint PATH (a checkpoint_*.pt of a run folder)")
    checkpoint = load_checkpoint(flags["model.checkpoint"][1])
    stored = checkpoint["config"]
    cfg = resolve(flags, base=stored)
    _check_same_model(to_dict(cfg.model), stored.get("model", {}))
    return cfg, checkpoint


def _check_same_model(given: Dict[str, Any], stored: Dict[str, Any], prefix: str = "model.") -> None:
    for key in sorted(set(given) | set(stored)):
        if key in _NOT_ARCHITECTURE:
            continue
        a, b = given.get(key), stored.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_same_model(a, b, f"{prefix}{key}.")
        elif a != b:
            raise ConfigError(
                f"{prefix}{key} is {a!r} in the given config but the checkpoint was trained with {b!r}; "
                "drop --common.config-file to use the checkpoint's own config"
            )


@torch.no_grad()
def predict(model, loader, opts) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and the loader's second field (labels or indices) for the whole split."""
    from engine.loops import autocast, to_device

    model.eval()
    all_logits, all_second = [], []
    for images, second in loader:
        images, _ = to_device(images, second, opts)
        with autocast(opts):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_second.append(second)
    return torch.cat(all_logits), torch.cat(all_second)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top5.eq(labels[:, None])
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits.any(dim=1).float().mean().item(),
        "count": int(labels.numel()),
    }


def per_class_accuracy(logits, labels, names: List[str], wnids: List[str]) -> List[Dict[str, Any]]:
    preds = logits.argmax(dim=1)
    rows = []
    for c, (wnid, name) in enumerate(zip(wnids, names)):
        mask = labels == c
        n = int(mask.sum())
        acc = 100.0 * float((preds[mask] == c).float().mean()) if n else float("nan")
        rows.append({"class": c, "wnid": wnid, "name": name, "count": n, "top1": acc})
    return rows


def select_weights(checkpoint: Dict[str, Any], use_ema: bool, path: str, flag: str = "--eval.ema") -> Dict[str, Any]:
    if not use_ema:
        if checkpoint.get("is_ema"):
            print("note: this checkpoint holds EMA weights", file=sys.stderr)
        return checkpoint["model"]
    if checkpoint.get("is_ema"):
        return checkpoint["model"]
    if checkpoint.get("ema") is not None:
        return checkpoint["ema"]
    raise ConfigError(f"{path} holds no EMA weights; drop {flag} or use checkpoint_ema_best.pt / checkpoint_last.pt")


def evaluate_checkpoint(cfg: Config, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    import cvnets
    import data
    from engine.loops import LoopOptions
    from engine.utils import resolve_device

    device = resolve_device(cfg.common.device)
    loader, dataset = data.build_eval_loader(cfg, cfg.eval.split)
    num_classes = checkpoint["num_classes"]
    model = cvnets.build_model(cfg.model, num_classes)
    model.load_state_dict(select_weights(checkpoint, cfg.eval.ema, cfg.model.checkpoint))
    fmt = torch.channels_last if cfg.common.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.common.mixed_precision]
    opts = LoopOptions(device=device, channels_last=cfg.common.channels_last, autocast_dtype=autocast)
    params = sum(p.numel() for p in model.parameters())

    logits, second = predict(model, loader, opts)
    result: Dict[str, Any] = {"checkpoint": cfg.model.checkpoint, "split": cfg.eval.split, "ema": cfg.eval.ema,
                              "params": params}
    wnids = checkpoint.get("wnids") or dataset.wnids
    if cfg.eval.split == "test":
        out = cfg.eval.predictions_csv or os.path.join(os.path.dirname(cfg.model.checkpoint) or ".", "predictions_test.csv")
        preds = logits.argmax(dim=1).tolist()
        files = [dataset.file_names[i] for i in second.tolist()]
        _write_predictions(out, files, [wnids[p] for p in preds])
        result.update(predictions=out, count=len(preds))
        return result
    result.update(accuracy_metrics(logits, second))
    if cfg.eval.per_class:
        result["per_class"] = per_class_accuracy(logits, second, dataset.class_names, wnids)
    return result


def _write_predictions(path: str, files: List[str], wnids: List[str]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "wnid"])
        writer.writerows(zip(files, wnids))
    os.replace(tmp, path)


def report(result: Dict[str, Any]) -> None:
    print(f"checkpoint: {result['checkpoint']}{' (EMA weights)' if result['ema'] else ''}")
    print(f"params: {result['params']:,}")
    if result["split"] == "test":
        print(f"test predictions: {result['count']} rows written to {result['predictions']}")
        return
    print(f"{result['split']} images: {result['count']}")
    print(f"loss: {result['loss']:.4f}")
    print(f"top1: {result['top1']:.2f}")
    print(f"top5: {result['top5']:.2f}")
    for row in result.get("per_class", []):
        print(f"  {row['class']:4d} {row['wnid']} {row['top1']:6.2f}% ({row['count']})  {row['name']}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, checkpoint = run_or_exit(lambda: load_eval_config(argv))
    result = run_or_exit(lambda: evaluate_checkpoint(cfg, checkpoint))
    report(result)
    if cfg.eval.output_json:
        from engine.utils import write_json

        write_json(cfg.eval.output_json, result)
    return result


if __name__ == "__main__":
    main()
