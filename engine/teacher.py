"""The teacher of `loss.name: distillation`: a checkpoint of this tool, rebuilt as main_eval rebuilds
a model (from the config stored inside it), frozen, on the training device.

Its identity is the SHA-256 of its weights (engine/checkpoint.weights_digest): the student's
checkpoints record it with the path, and a resume with a teacher whose weights differ is
refused, so a run never silently switches teachers half-way.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from cvnets.fuse import fold_batchnorm
from engine import checkpoint as ckpt
from engine.evaluation import trained_model
from loss_fn.distillation import Teacher
from options.config import from_dict
from options.schema import Config

KEY = "loss.distillation.teacher"


def check_teacher_path(cfg: Config) -> None:
    """ValueError, before any work, when distillation names a teacher file that is not there."""
    path = cfg.loss.distillation.teacher
    if cfg.loss.name != "distillation" or path is None:
        return
    if not os.path.isfile(path):
        where = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{KEY}: {path} {where}; train the teacher first (e.g. python main_train.py "
                         "--common.config-file config/beyond/teacher_resnet18_cifar.yaml) and give its "
                         "checkpoint_best.pt")


def load_teacher(cfg: Config, wnids: Sequence[str], device: torch.device) -> Tuple[Teacher, Dict[str, str]]:
    """(the frozen teacher on `device`, {"path", "sha256"} to record in the student's checkpoints).

    Raises ValueError when the teacher was trained on another class list than `wnids` (the
    student's dataset), CheckpointError when its file is not a usable checkpoint."""
    check_teacher_path(cfg)
    path = cfg.loss.distillation.teacher
    state = ckpt.load(path)
    theirs = list(state.get("wnids") or [])
    if not theirs:
        raise ValueError(f"{KEY}: {path} holds no class list (imported weights?); fine-tune it on this dataset "
                         "first and distil from that run's checkpoint_best.pt")
    if len(theirs) != len(wnids) or int(state["num_classes"]) != len(wnids):
        raise ValueError(f"{KEY}: {path} predicts {state['num_classes']} classes, this run's dataset has "
                         f"{len(wnids)}; distil from a teacher trained on the same dataset")
    other = ckpt.class_list_difference(theirs, wnids)
    if other is not None:
        raise ValueError(f"{KEY}: {path} was trained on another class list ({other}); distil from a teacher "
                         "trained on the same dataset")
    try:
        teacher_cfg = from_dict(state["config"], source=f"in the teacher {path}")
    except ValueError as e:
        raise ckpt.CheckpointError(f"{KEY}: {e}") from None
    with torch.random.fork_rng(devices=[]):  # building draws an init the weights then replace: leave the
        model = trained_model(teacher_cfg, state, use_ema=False, flag="")  # run's random stream as it was
    identity = {"path": path, "sha256": ckpt.weights_digest(state["model"])}
    student_crop, teacher_crop = cfg.sampler.crop_size, teacher_cfg.sampler.crop_size
    teacher = Teacher(fold_batchnorm(model)[0], resize=teacher_crop / student_crop,
                      student_norm=_norm(cfg), teacher_norm=_norm(teacher_cfg))
    fmt = torch.channels_last if cfg.common.channels_last else torch.contiguous_format
    return teacher.to(device=device, memory_format=fmt), identity


def _norm(cfg: Config) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    aug = cfg.image_augmentation
    return None if aug.mean is None else (tuple(aug.mean), tuple(aug.std))


def teacher_change(stored: Optional[Dict[str, str]], current: Optional[Dict[str, str]]) -> Optional[str]:
    """What differs between the teacher a checkpoint was trained with and this run's, or None."""
    old = stored.get("sha256") if stored else None
    new = current.get("sha256") if current else None
    if old == new:
        return None
    return f"its teacher was {_describe(stored)}, this run's is {_describe(current)}"


def _describe(teacher: Optional[Dict[str, str]]) -> str:
    return f"{teacher['path']} (weights sha256 {teacher['sha256'][:12]})" if teacher else "none"
