"""Evaluating a checkpoint (main_eval.py): metrics on val, per-class accuracy, test predictions.

The model is rebuilt from the config stored in the checkpoint. A config file given as well may
change how the data is read and evaluated, but must describe the same model.
"""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

import cvnets
import data
from cvnets.fuse import fold_batchnorm
from engine import checkpoint as ckpt
from engine.loops import AUTOCAST_DTYPES, LoopOptions, predict
from engine.utils import Meter, resolve_device
from options.config import override, to_dict
from utils.files import atomic_open, file_in_the_way
from options.schema import Config

_NOT_ARCHITECTURE = ("checkpoint", "freeze")


def check_same_model(cfg: Config, stored: Mapping[str, Any]) -> None:
    """ValueError when the resolved model section differs from the checkpoint's."""
    _compare(to_dict(cfg.model), stored.get("model", {}), "model.")


def _compare(given: Mapping[str, Any], stored: Mapping[str, Any], prefix: str) -> None:
    for key in sorted(set(given) | set(stored)):
        if key in _NOT_ARCHITECTURE:
            continue
        a, b = given.get(key), stored.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _compare(a, b, f"{prefix}{key}.")
        elif a != b:
            raise ValueError(
                f"{prefix}{key} is {a!r} in the given config but the checkpoint was trained with {b!r}; "
                "drop --common.config-file to use the checkpoint's own config"
            )


def check_output_file(key: str, path: Optional[str], example: str = "") -> None:
    """ValueError when `path` (of config key `key`) cannot be written as a file: a folder is
    there, or a file stands where one of its folders would be. `example`: a file name to suggest."""
    if not path:
        return
    if os.path.isdir(path):
        suggestion = f" (e.g. {os.path.join(path, example)})" if example else ""
        raise ValueError(f"{key}: {path} is a folder; give a file path inside it{suggestion}")
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise ValueError(f"{key}: {blocker} is a file, so {path} cannot be written; give a path in a folder")


def trained_model(cfg: Config, state: Mapping[str, Any], use_ema: bool, flag: str) -> torch.nn.Module:
    """The checkpoint's model (or EMA) weights in the architecture its config describes, in eval mode."""
    model = cvnets.build_model(cfg.model, state["num_classes"])
    try:
        model.load_state_dict(ckpt.weights(state, use_ema, cfg.model.checkpoint, flag))
    except RuntimeError as e:  # missing or unexpected keys, other shapes: the file was edited or mixed up
        first = str(e).strip().splitlines()[0]
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
        raise ckpt.CheckpointError(f"{cfg.model.checkpoint}: its weights do not fit the model its config describes "
                                   f"({first} {detail[:200]}); use a checkpoint written by main_train.py as it is"
                                   ) from None
    return model.eval()


def at_image_size(cfg: Config) -> Config:
    """cfg with image_augmentation.val replaced by resize N + 8, center crop N when eval.image_size
    is N: the margin of the default pipeline (72 -> 64) at another resolution."""
    n = cfg.eval.image_size
    if n is None:
        return cfg
    return override(cfg, {"image_augmentation.val": [{"name": "resize", "size": n + 8},
                                                     {"name": "center_crop", "size": n}]})


def evaluate_checkpoint(cfg: Config, state: Mapping[str, Any]) -> Dict[str, Any]:
    """Metrics (val/train) or predictions (test) of the checkpoint's model on cfg.eval.split."""
    device = resolve_device(cfg.common.device)
    cfg = at_image_size(cfg)
    loader, dataset = data.build_eval_loader(cfg, cfg.eval.split, device=device)
    other = ckpt.class_list_difference(state.get("wnids"), dataset.wnids)
    if other and cfg.eval.split != "test":  # test predictions are named by the checkpoint's own wnids
        raise ckpt.CheckpointError(f"{cfg.model.checkpoint} was trained on another class list than "
                                   f"{cfg.dataset.root} ({other}): its labels would be wrong; evaluate it on "
                                   "the dataset it was trained on (--dataset.root)")
    model = trained_model(cfg, state, cfg.eval.ema, "--eval.ema")
    params = sum(p.numel() for p in model.parameters())
    fmt = torch.channels_last if cfg.common.channels_last else torch.contiguous_format
    folded = fold_batchnorm(model)[0].to(device=device, memory_format=fmt)
    opts = LoopOptions(device=device, channels_last=cfg.common.channels_last,
                       autocast_dtype=AUTOCAST_DTYPES[cfg.common.mixed_precision])
    sizes: List[List[int]] = []

    def measured(batches):  # the resolution the model really saw, whatever the pipeline says
        for images, targets in batches:
            if not sizes:
                sizes.append(list(images.shape[-2:]))
            yield images, targets

    outputs = [(logits.cpu(), targets.cpu()) for logits, targets in predict(folded, measured(loader), opts)]
    logits = torch.cat([o[0] for o in outputs])
    second = torch.cat([o[1] for o in outputs])

    result: Dict[str, Any] = {"checkpoint": cfg.model.checkpoint, "split": cfg.eval.split, "ema": cfg.eval.ema,
                              "params": params, "image_size": sizes[0] if sizes else None}
    wnids = state.get("wnids") or dataset.wnids
    if cfg.eval.split == "test":
        out = cfg.eval.predictions_csv or os.path.join(os.path.dirname(cfg.model.checkpoint) or ".",
                                                       "predictions_test.csv")
        names = state.get("class_names") or dataset.class_names
        write_predictions(out, [dataset.file_names[i] for i in second.tolist()], logits, wnids, names)
        result.update(predictions=out, count=len(logits))
        return result
    meter = Meter(torch.device("cpu"))
    meter.update(logits, second, F.cross_entropy(logits, second))
    result.update(meter.compute())
    if cfg.eval.per_class:
        result["per_class"] = per_class_accuracy(logits, second, dataset.class_names, wnids)
    return result


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, names: List[str],
                       wnids: List[str]) -> List[Dict[str, Any]]:
    preds = logits.argmax(dim=1)
    rows = []
    for c, (wnid, name) in enumerate(zip(wnids, names)):
        mask = labels == c
        n = int(mask.sum())
        acc = 100.0 * float((preds[mask] == c).float().mean()) if n else float("nan")
        rows.append({"class": c, "wnid": wnid, "name": name, "count": n, "top1": acc})
    return rows


def write_predictions(path: str, files: List[str], logits: torch.Tensor, wnids: List[str], names: List[str]) -> None:
    """One row per image: file, predicted wnid, its words.txt name, its softmax probability, and
    the top-5 wnids (best first, space-separated)."""
    probs = logits.float().softmax(dim=1)
    top_p, top_i = probs.topk(min(5, probs.shape[1]), dim=1)  # [N, k]
    with atomic_open(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "wnid", "name", "score", "top5"])
        for file, p, idx in zip(files, top_p.tolist(), top_i.tolist()):
            writer.writerow([file, wnids[idx[0]], names[idx[0]], f"{p[0]:.4f}", " ".join(wnids[i] for i in idx)])


def report(result: Mapping[str, Any]) -> List[str]:
    lines = [f"checkpoint: {result['checkpoint']}{' (EMA weights)' if result['ema'] else ''}",
             f"params: {result['params']:,}"]
    if result.get("image_size"):
        lines.append("image size: {}x{}".format(*result["image_size"]))
    if result["split"] == "test":
        return lines + [f"test predictions: {result['count']} rows written to {result['predictions']}"]
    lines += [f"{result['split']} images: {result['count']}", f"loss: {result['loss']:.4f}",
              f"top1: {result['top1']:.2f}", f"top5: {result['top5']:.2f}"]
    lines += [f"  {row['class']:4d} {row['wnid']} {row['top1']:6.2f}% ({row['count']})  {row['name']}"
              for row in result.get("per_class", [])]
    return lines
