"""Exporting a checkpoint (main_export.py) as TorchScript or ONNX, with a JSON sidecar.

The model is rebuilt from the config stored in the checkpoint (as main_eval does), put in eval
mode, and every BatchNorm that directly follows a convolution is folded into it. The artifact
is written (atomically) only after it reproduces the checkpoint model's logits on noise,
smooth synthetic images and, when the dataset is on disk, a few val images. <artifact>.json
beside it lists the classes and the preprocessing the model expects. ONNX needs the export
extra: pip install -e '.[export]'. The model-level pieces (tracing, ONNX, parity) live in
cvnets/export.py.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import data
from cvnets.export import (
    INPUT_NAME,
    MIN_DYNAMIC_SIDE,
    OUTPUT_NAME,
    ParityResult,
    check_parity,
    export_model,
    load_runner,
    make_any_size,
    package_versions,
    parity_cases,
    require_onnx,
)
from cvnets.fuse import count_batchnorms, fold_batchnorm
from data.base import DatasetError
from data.augment import Normalize
from data.transforms import build_transforms
from data.tinyimagenet import read_classes
from engine.evaluation import check_output_file, trained_model
from options.config import override, to_dict
from utils.files import atomic_write_bytes, write_json
from options.schema import Config

EXTENSIONS = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
PARITY_IMAGES = 8  # images per parity case

logger = logging.getLogger("cvnets")


# ----------------------------------------------------------------------------- inputs
def input_size(cfg: Config) -> int:
    """Side of the square images the val pipeline hands the model: its transforms run on one stored image."""
    images = torch.zeros(1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    for i, transform in enumerate(build_transforms(cfg.image_augmentation.val, "image_augmentation.val")):
        images = transform(images, cfg.sampler.crop_size, np.random.default_rng(i))
    return int(images.shape[-1])


def normalizer(cfg: Config) -> Callable[[Tensor], Tensor]:
    """[0, 1] images -> what the model was trained on (mean/std normalised when configured)."""
    aug = cfg.image_augmentation
    if aug.mean is None and aug.std is None:
        return lambda images: images
    return Normalize(aug.mean, aug.std)


def weights_kind(cfg: Config, checkpoint: Dict[str, Any]) -> str:
    """'ema' or 'model': which weights the export uses (a *_ema_best.pt file holds EMA weights)."""
    return "ema" if cfg.export.ema or checkpoint.get("is_ema") else "model"


def default_output(checkpoint_path: str, fmt: str, ema_state: bool) -> str:
    """results/RUN/checkpoint_best.pt -> results/RUN/checkpoint_best.onnx (_ema when EMA of a last file)."""
    stem = os.path.splitext(checkpoint_path)[0]
    return stem + ("_ema" if ema_state else "") + EXTENSIONS[fmt]


# ----------------------------------------------------------------------------- classes and images
def class_table(cfg: Config, checkpoint: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], str]:
    """[{index, wnid, name}] in class order and where the names came from."""
    count = checkpoint["num_classes"]
    wnids = checkpoint.get("wnids") or [None] * count
    names = checkpoint.get("class_names")
    source = "checkpoint"
    if not names:
        by_wnid = _dataset_names(cfg.dataset.root)
        names = [by_wnid.get(w) for w in wnids] if by_wnid else [None] * count
        source = f"{cfg.dataset.root}/words.txt" if by_wnid else "none (wnids only)"
    return [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(zip(wnids, names))], source


def _dataset_names(root: str) -> Optional[Dict[str, str]]:
    """wnid -> words.txt name from a dataset on disk; None without one (names are a nicety)."""
    if not os.path.isdir(root):
        return None
    try:
        classes = read_classes(root)
    except DatasetError:
        return None
    return dict(zip(classes.wnids, classes.names))


def dataset_images(cfg: Config, count: int, size: int) -> Optional[Tensor]:
    """The first `count` val images, preprocessed as main_eval feeds them, if the dataset is on disk."""
    if not os.path.isdir(cfg.dataset.root):
        return None
    quick = override(cfg, {"dataset.workers": 0, "dataset.val_batch_size": count, "dataset.cache": "none"})
    try:
        images, _ = next(iter(data.build_eval_loader(quick, "val")[0]))
    except (ValueError, DatasetError) as e:  # a broken tree only costs this parity case
        logger.info("note: no dataset images for the parity check: %s", e)
        return None
    return images if tuple(images.shape[-2:]) == (size, size) else None


# ----------------------------------------------------------------------------- export
def export_checkpoint(cfg: Config, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """Fold, export, verify and write the artifact and its sidecar; the sidecar's content."""
    e = cfg.export
    if e.format == "onnx":
        require_onnx(export=True, run=e.verify)
    output = output_path(cfg, checkpoint)
    model = trained_model(cfg, checkpoint, e.ema, "--export.ema")
    folded, pairs = fold_batchnorm(model)
    any_size = make_any_size(folded) if e.dynamic_shape else 0
    size = input_size(cfg)
    logger.info("checkpoint: %s (%s weights)", cfg.model.checkpoint, weights_kind(cfg, checkpoint))
    logger.info("folded %d BatchNorm layers into the convolutions before them (%d without a convolution in "
                "front kept as they are)", pairs, count_batchnorms(folded))

    parity = write_artifact(cfg, model, folded, output, size)
    info = sidecar(cfg, checkpoint, model, output, size, pairs, parity, limitations(cfg, size, any_size))
    write_json(f"{output}.json", info)
    info["path"] = output
    return info


def output_path(cfg: Config, checkpoint: Dict[str, Any]) -> str:
    """export.output, else a name beside the checkpoint; never the checkpoint itself."""
    e = cfg.export
    output = e.output or default_output(cfg.model.checkpoint, e.format, e.ema and not checkpoint.get("is_ema"))
    if os.path.abspath(output) == os.path.abspath(cfg.model.checkpoint):
        raise ValueError(f"export.output: {output} is the checkpoint itself; choose another path")
    check_output_file("export.output", output, example="model" + EXTENSIONS[e.format])
    return output


def write_artifact(cfg: Config, model: nn.Module, folded: nn.Module, output: str,
                   size: int) -> Optional[List[ParityResult]]:
    """Export `folded` in memory, check it against `model`, then write it to `output` atomically:
    a failed export or parity check leaves nothing behind, and a full disk is one DiskFullError
    naming `output`'s folder. The parity results (None unverified)."""
    e = cfg.export
    logger.info("exporting %s ...", e.format)
    example = torch.rand(e.batch_size, 3, size, size)
    artifact = export_model(folded, example, e.format, e.opset, e.dynamic_batch, e.dynamic_shape)
    parity = verify(cfg, model, artifact, size) if e.verify else None
    atomic_write_bytes(output, artifact)
    return parity


def verify(cfg: Config, model: nn.Module, artifact: bytes, size: int) -> List[ParityResult]:
    """Run the unfolded checkpoint model and the artifact on the same inputs (ParityError beyond tolerance)."""
    e = cfg.export
    cases = parity_cases(size, e.batch_size, normalizer(cfg), e.dynamic_batch, e.dynamic_shape,
                         real_images=dataset_images(cfg, PARITY_IMAGES, size), per_case=PARITY_IMAGES,
                         seed=cfg.common.seed)
    results = check_parity(model, load_runner(artifact, e.format), cases, e.tolerance)
    logger.info("parity with the checkpoint model (tolerance %g):", e.tolerance)
    for result in results:
        logger.info("  %s", result.describe())
    return results


def limitations(cfg: Config, size: int, any_size_blocks: int) -> List[str]:
    """What the artifact does not do, in words (printed and stored in the sidecar)."""
    e = cfg.export
    if e.dynamic_shape:
        checked = "; verified at the sizes the parity results list" if e.verify else ""
        notes = [f"any height and width >= {MIN_DYNAMIC_SIDE}{checked}"]
    else:
        hint = "" if e.format == "torchscript" else "; --export.dynamic-shape true exports any size"
        notes = [f"input size fixed at {size}x{size}: resize and center-crop as in preprocessing{hint}"]
    if any_size_blocks:
        notes.append(f"MobileViT blocks ({any_size_blocks}) resize to whole 2x2 patches at every size in this "
                     "graph (a no-op on even-sized maps): an exported graph cannot make that choice per input")
    if not e.dynamic_batch and e.format == "onnx":
        notes.append(f"batch size {e.batch_size} only (the graph fixes it)")
    elif not e.dynamic_batch:
        notes.append(f"batch size {e.batch_size} checked; other batch sizes run unchecked "
                     "(--export.dynamic-batch true checks one)")
    return notes


def preprocessing(cfg: Config) -> Dict[str, Any]:
    """How images become model input: scaling, normalisation and the val transforms."""
    aug = cfg.image_augmentation
    normalized = aug.mean is not None
    return {"pixel_range": [0.0, 1.0], "scale": "uint8 pixels / 255",
            "mean": list(aug.mean) if normalized else None, "std": list(aug.std) if aug.std is not None else None,
            "normalize": "(x - mean) / std per channel, after scaling" if normalized else "none",
            "val_transforms": to_dict(aug.val)}


def sidecar(cfg: Config, checkpoint: Dict[str, Any], model: nn.Module, output: str, size: int, pairs: int,
            parity: Optional[List[ParityResult]], notes: List[str]) -> Dict[str, Any]:
    """Everything a deployment needs to feed the artifact and read its output."""
    e = cfg.export
    classes, names_source = class_table(cfg, checkpoint)
    batch: Any = "batch" if e.dynamic_batch else e.batch_size
    height, width = ("height", "width") if e.dynamic_shape else (size, size)
    exporter = "torch.jit.trace" if e.format == "torchscript" else f"torch.onnx.export (torch.export), opset {e.opset}"
    return {
        "artifact": os.path.basename(output),
        "format": e.format,
        "exporter": exporter,
        "source": {"checkpoint": cfg.model.checkpoint, "weights": weights_kind(cfg, checkpoint),
                   "epoch": checkpoint.get("epoch")},
        "model": {"name": cfg.model.name, "config": to_dict(cfg.model), "num_classes": checkpoint["num_classes"],
                  "params": checkpoint.get("params") or sum(p.numel() for p in model.parameters()),
                  "batchnorm_folded": pairs},
        "input": {"name": INPUT_NAME, "shape": [batch, 3, height, width], "dtype": "float32", "layout": "NCHW",
                  "channel_order": "RGB", "size": size, "dynamic_batch": e.dynamic_batch,
                  "dynamic_shape": e.dynamic_shape},
        "preprocessing": preprocessing(cfg),
        "output": {"name": OUTPUT_NAME, "shape": [batch, checkpoint["num_classes"]],
                   "meaning": "raw logits (softmax gives probabilities); index i is classes[i]"},
        "classes": classes,
        "class_names_source": names_source,
        "parity": None if parity is None else {"tolerance": e.tolerance, "cases": [asdict(r) for r in parity]},
        "limitations": notes,
        "versions": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def report(info: Mapping[str, Any]) -> List[str]:
    lines = [f"note: {note}" for note in info["limitations"]]
    return lines + [f"wrote {info['path']} ({os.path.getsize(info['path']) / 2**20:.1f} MiB) and {info['path']}.json"]


