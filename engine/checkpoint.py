"""The checkpoint format: what a checkpoint holds, how it is written and how it is read.

A checkpoint is a dict of tensors and plain data (no Python objects), written atomically and
read with `torch.load(weights_only=True)`, so loading a file can never run code: a file holding
anything else is refused with one line. Two kinds:

- training state (`checkpoint_last.pt`): everything a resumed run needs to continue exactly:
  model, optimizer, scheduler, grad scaler, EMA, progress, best metrics, the per-epoch history
  (which metrics.jsonl is rebuilt from), the torch RNG states and the resolved config;
- weights (`checkpoint_best.pt`, `checkpoint_ema_best.pt`): the model (or EMA) weights of one
  epoch with its metrics and the config, for evaluation, export and fine-tuning.

Every checkpoint also holds the class list (wnids and names), which resume and evaluation
compare with the dataset's, the parameter count, and a CRC-32 of everything it stores, which
`load` verifies: a flipped bit in the tensor data is a one-line error, not silently wrong weights.
Weights imported from another library (tools/import_weights.py) are a weights checkpoint too, with
an empty class list (unknown: never compared) and a `source` record (path, layout, SHA-256);
fine-tuning (`load_pretrained`) also reads foreign weights files directly, through cvnets.pretrained.

    python -m engine.checkpoint --upgrade PATH   # convert a format-1 checkpoint you trust
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.files import atomic_write_bytes

VERSION = 2  # 1: cvnets-tiny 0.1 (pickled numpy/python RNG states); 2: tensors and plain data only
TRAINING, WEIGHTS = "training", "weights"
CHECKSUM = "checksum"  # key of the CRC-32 over everything else the checkpoint holds
CLASSIFIER_WEIGHT = "classifier.1.weight"  # both families' linear layer


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the one-line message names the file and the fix."""


# ----------------------------------------------------------------------------- writing
def save(state: Mapping[str, Any], path: str) -> None:
    """Write `state` (plus the format version) atomically: serialised in memory first, so the
    free space is checked against the exact size and a full disk leaves the old file as it was."""
    state = {**state, "version": VERSION}
    state[CHECKSUM] = checksum(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer().tobytes())


def checksum(state: Mapping[str, Any]) -> str:
    """CRC-32 of every value in `state` but the checksum itself: tensors by dtype, shape and raw
    bytes, plain data by type and repr, in a fixed order (about 0.5 s per GB of tensors)."""
    crc = 0
    for path, value in _leaves({k: v for k, v in state.items() if k != CHECKSUM}):
        crc = zlib.crc32(path.encode(), crc)
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            crc = zlib.crc32(f"{tensor.dtype}{tuple(tensor.shape)}".encode(), crc)
            if tensor.numel():
                crc = zlib.crc32(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), crc)
        else:
            crc = zlib.crc32(f"{type(value).__name__}:{value!r}".encode(), crc)
    return f"crc32:{crc:08x}"


def _leaves(value: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            yield from _leaves(value[key], f"{path}/{key!r}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def rng_state() -> Dict[str, Any]:
    """The random states a run consumes: torch's CPU generator and, when present, CUDA's
    (dropout and weight init draw from them; augmentation is seeded per batch)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- reading
def load(path: str, kind: Optional[str] = None) -> Dict[str, Any]:
    """Read a checkpoint of this tool (any kind, or the given one); CheckpointError otherwise."""
    return _checked(_read(path), path, kind)


def _read(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal(path, e)) from None
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}); "
                              "is it a complete checkpoint of this tool?") from None


def _is_ours(state: Any) -> bool:
    return isinstance(state, dict) and "model" in state and "config" in state


def _checked(state: Any, path: str, kind: Optional[str] = None) -> Dict[str, Any]:
    if not _is_ours(state):
        raise CheckpointError(f"{path} is not a checkpoint of this tool (no model weights and config inside)")
    for key in ("model", "config"):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{path} is not a checkpoint of this tool (its {key} is a "
                                  f"{type(state[key]).__name__}, not a mapping)")
    version = state.get("version")
    if version != VERSION:
        raise CheckpointError(_version_advice(path, version))
    # Checkpoints written before the checksum existed carry none: nothing to verify.
    if CHECKSUM in state and checksum(state) != state[CHECKSUM]:
        raise CheckpointError(f"{path} is damaged: what it holds no longer matches the checksum written with it "
                              "(a flipped bit on disk or in a copy); use another copy of the file, or another "
                              "checkpoint of the run")
    if kind == TRAINING and state.get("kind") != TRAINING:
        raise CheckpointError(f"{path} holds weights only, not a training state; resume from checkpoint_last.pt")
    return state


def _refusal(path: str, error: Exception) -> str:
    text = str(error)
    if "GLOBAL" in text or "global" in text:  # the part of torch's message naming the forbidden object
        first = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        detail = f" ({first.rstrip('.')})" if first else ""
    else:
        detail = ""
    return (f"refused to load {path}: it holds Python objects besides tensors and plain data{detail}; "
            "this tool never runs code from a file. If it is a checkpoint of cvnets-tiny 0.1 that you trust, "
            f"convert it once with: python -m engine.checkpoint --upgrade {path}")


def _version_advice(path: str, version: Any) -> str:
    if isinstance(version, int) and version > VERSION:
        return (f"{path} has checkpoint format {version}, newer than this version reads ({VERSION}); "
                "upgrade cvnets-tiny to use it")
    return (f"{path} has checkpoint format {version!r}; this version reads format {VERSION}. "
            f"If you trust the file, convert it once with: python -m engine.checkpoint --upgrade {path}")


def class_list_difference(stored: Optional[Sequence[str]], current: Sequence[str]) -> Optional[str]:
    """None when a checkpoint's class list matches the dataset's (or it has none), else
    a short description of the first difference."""
    if not stored or list(stored) == list(current):  # none or empty (imported weights): unknown
        return None
    if len(stored) != len(current):
        return f"{len(stored)} classes, the dataset has {len(current)}"
    i = next(i for i, (a, b) in enumerate(zip(stored, current)) if a != b)
    return f"class {i} is {stored[i]} in the checkpoint but {current[i]} in the dataset"


def weights(state: Mapping[str, Any], use_ema: bool, path: str, flag: str = "--eval.ema") -> Dict[str, Any]:
    """The model (or, with use_ema, the EMA) weights a checkpoint holds."""
    if not use_ema or state.get("is_ema"):
        return state["model"]
    if state.get("ema") is not None:
        return state["ema"]["module"]
    raise CheckpointError(f"{path} holds no EMA weights; drop {flag} or use checkpoint_ema_best.pt / checkpoint_last.pt")


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: the identity of a set of weights,
    whichever file holds them."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class Pretrained:
    """What load_pretrained did: the file's layout, tensors loaded, and the classifier keys left fresh."""

    layout: str
    loaded: int
    total: int
    fresh: Tuple[str, ...]
    file_classes: Optional[int]
    wnids: Tuple[str, ...] = ()  # the class list of a checkpoint of this tool; () when unknown

    def describe(self, path: str, num_classes: int) -> str:
        """The one log line of a fine-tuning start."""
        line = f"initialised from {path} ({self.layout}): {self.loaded} of {self.total} tensors loaded"
        if self.fresh:
            line += f"; classifier re-initialised for {num_classes} classes (the file has {self.file_classes})"
        return line


def load_pretrained(model: nn.Module, path: str, model_cfg: Any) -> Pretrained:
    """Initialise `model` from a checkpoint of this tool or a foreign weights file (fine-tuning).

    Foreign files (timm, torchvision, ml-cvnets, Hugging Face) are recognised by their keys and
    mapped exactly (cvnets.pretrained). A classifier for another number of classes keeps its
    fresh initialisation; any other difference (missing or extra keys, another shape) means
    another architecture and is a CheckpointError.
    """
    from cvnets import pretrained

    own = model.state_dict()
    try:
        state = pretrained.read_state_dict(path) if path.endswith(".safetensors") else _read(path)
        if _is_ours(state):
            given, layout = _checked(state, path)["model"], "a checkpoint of this tool"
            odd = sorted(set(given) ^ set(own))
            if odd:
                raise CheckpointError(f"model.checkpoint {path} holds another architecture (e.g. "
                                      f"{', '.join(odd[:3])}); pick a checkpoint of the same model")
            wrong = [k for k in own if given[k].shape != own[k].shape]
            bad = next((k for k in wrong if not k.startswith(pretrained.CLASSIFIER)), None)
            if bad is not None:
                raise CheckpointError(f"model.checkpoint {path} holds another architecture: {bad} is "
                                      f"{tuple(given[bad].shape)}, the model's {tuple(own[bad].shape)}")
            weights = {k: v for k, v in given.items() if k not in wrong}
            file_classes = int(given[CLASSIFIER_WEIGHT].shape[0])
            wnids = tuple(state.get("wnids") or ())
        else:
            state = pretrained.unwrap(state, path)
            fmt, family = pretrained.detect_format(state)
            if family != model_cfg.name:
                raise CheckpointError(f"model.checkpoint {path} holds {family} weights ({fmt} layout) but "
                                      f"model.name is {model_cfg.name}; use a {family} config")
            layout = f"{fmt} layout"
            weights, _ = pretrained.to_project(fmt, model_cfg, own, state, classifier_may_differ=True)
            head = pretrained.places(fmt, model_cfg, own)["classifier.1"][0] + ".weight"
            file_classes = int(state[head].shape[0])
            wnids = ()
    except pretrained.WeightMappingError as e:
        raise CheckpointError(f"model.checkpoint {path}: {e}") from None
    model.load_state_dict({**own, **weights})
    fresh = tuple(k for k in own if k.startswith(pretrained.CLASSIFIER) and k not in weights)
    return Pretrained(layout, len(weights), len(own), fresh, file_classes, wnids)


def imported_state(cfg_dict: Mapping[str, Any], weights: Mapping[str, Any], params: int,
                   source: Mapping[str, Any]) -> Dict[str, Any]:
    """A weights checkpoint of another library's weights in this project's layout, with the resolved
    config they belong to and where they came from (the class list is unknown: none)."""
    return {"kind": WEIGHTS, "model": dict(weights), "config": dict(cfg_dict),
            "num_classes": int(weights[CLASSIFIER_WEIGHT].shape[0]), "wnids": [], "class_names": [],
            "params": params, "source": dict(source)}


# ----------------------------------------------------------------------------- format 1 -> 2
def upgrade(path: str) -> None:
    """Rewrite a trusted format-1 checkpoint (cvnets-tiny 0.1) in format 2, in place.

    Format 1 pickled numpy and Python RNG states, which weights-only loading refuses; this is
    the one place that unpickles, and only on the user's explicit request.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    try:
        old = torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for this file
    except Exception as e:  # a text file, a truncated one, ...
        raise CheckpointError(f"cannot read {path} as a checkpoint ({type(e).__name__}); give a format-1 "
                              "checkpoint of cvnets-tiny 0.1") from None
    if not isinstance(old, dict) or old.get("version") != 1:
        raise CheckpointError(f"{path} is not a format-1 checkpoint of this tool; nothing to upgrade")
    new = {k: v for k, v in old.items() if k not in ("rng", "version", "progress")}
    new["kind"] = TRAINING if "optimizer" in old else WEIGHTS
    # The stored config in today's schema (renamed keys converted), saying what 0.1 did where
    # this version added a choice: no EMA warmup, later cvnets' variable batch rule.
    from options.config import load_config, override, to_dict

    cfg = load_config([], base=old["config"])
    new["config"] = to_dict(override(cfg, {"ema.warmup": False, "sampler.vbs.batch_rule": "constant_pixels"}))
    if "optimizer" in old:
        new["rng"] = {"torch": old["rng"]["torch"], "cuda": old["rng"].get("cuda")}
        new["progress"] = {"epoch": old["epoch"], "iteration": old["iteration"],
                           "batch_in_epoch": old["batch_in_epoch"], "meter": old.get("meter")}
        new["history"] = []  # format 1 kept no history; metrics.jsonl is trusted as it is
        if old.get("ema") is not None:
            new["ema"] = {"module": old["ema"], "updates": old["iteration"]}
    save(new, path)


if __name__ == "__main__":  # python -m engine.checkpoint --upgrade PATH
    from engine.commands import upgrade_checkpoint

    sys.exit(upgrade_checkpoint())
