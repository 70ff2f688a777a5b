"""Every configuration key, its type, its default, its valid range and a one-line description.

This file is the single place where defaults live, and each section checks its own values
when it is built (``Section.__post_init__``), so loading a config, ``--print-config`` and
``--help`` all see the same rules before any data or model is touched. Sections are frozen
dataclasses; ``name`` fields are ``Literal`` choices (the one list of names of each kind: the
registries of cvnets/, data/, loss_fn/ and optim/ check their entries against it) and a block
named after each choice holds that entry's own settings (``optim.name: adamw`` reads
``optim.adamw.*``).

Types understood by the loader (options/config.py): int, float, bool, str,
Literal[...], Optional[X], Tuple[X, ...] (written as lists in YAML) and
Tuple[Dict[str, Any], ...] for augmentation lists. Numbers are finite and strings non-empty.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, FrozenSet, Iterator, Literal, Mapping, Optional, Tuple, Union

from options.errors import FieldError, did_you_mean


def freeze(value: Any) -> Any:
    """Deep read-only copy of plain YAML data (dicts -> mappingproxy, lists -> tuples)."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


# --------------------------------------------------------------------------- valid ranges
def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The valid values of a number (of each item, for a list): bounds inclusive unless open."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if x != x:  # nan fails every comparison, so it would pass both bounds below
            return False
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return not (self.high is not None and (x > self.high or (self.high_open and x == self.high)))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)
RATE = Range(0, 1, high_open=True)  # dropout, label smoothing, momentum, betas: 1 would erase the signal
FACTOR = Range(0, 1, low_open=True)  # LR multipliers and the EMA momentum: 0 would stop all change
SEED = Range(0, 2**32 - 1)  # numpy's legacy seeding takes 32-bit seeds
# Upper bounds on what a run can mean: beyond them a value is a typo, and acting on it would hang
# (epochs: the schedule's totals are computed up front) or allocate gigabytes before the first line.
EPOCHS = Range(1, 10_000)
BATCH = Range(1, 65_536)  # per process
SCALES = Range(1, 256)


def opt(default: Any, help: str, valid: Optional[Range] = None, **metadata: Any):
    """A dataclass field with a default, a one-line description for --help and its valid range.

    Facts about a key go in `metadata`: `harmless=True` marks a key a resume may change freely
    (where files are, how fast or verbose the run is), as it does not change what the run computes.
    """
    return field(default=default, metadata={"help": help, "valid": valid, **metadata})


def block(cls, help: str, **metadata: Any):
    """A nested section; `metadata` (e.g. harmless=True) holds for every key inside it."""
    return field(default_factory=cls, metadata={"help": help, **metadata})


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> Dict[str, Any]:
    """The resolved field types of a section (annotations are strings in this module)."""
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _nullable(cls: type) -> FrozenSet[str]:
    return frozenset(name for name, tp in hints(cls).items() if type(None) in typing.get_args(tp))


class Section:
    """Base of every section: each field is checked against its `valid` range, then `check()`.

    Problems raise FieldError(field, problem); the loader adds the section's path and where
    the value came from (file or flag).
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            null = " or null" if f.name in _nullable(type(self)) else ""
            _check_value(f.name, getattr(self, f.name), f.metadata.get("valid"), null)
        self.check()

    def check(self) -> None:
        """Rules between fields of this section; raise FieldError naming one of them."""


def _check_value(name: str, value: Any, valid: Optional[Range], null: str) -> None:
    if value is None or isinstance(value, (bool, Mapping)) or dataclasses.is_dataclass(value):
        return
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_value(f"{name}[{i}]", item, valid, "")
        return
    if isinstance(value, str):
        if not value.strip():
            raise FieldError(name, f"{value!r} is empty; give a value{null}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(name, f"{value!r} must be a finite number" + (f" {valid}" if valid else "") + null)
    if valid is not None and value not in valid:
        raise FieldError(name, f"{value!r} must be {valid}{null}")


def _check_order(low_name: str, low: float, high_name: str, high: float) -> None:
    if low > high:
        raise FieldError(low_name, f"{low!r} must be <= {high_name} ({high!r})")


# --------------------------------------------------------------------------- common
@dataclass(frozen=True)
class CommonConfig(Section):
    config_file: Optional[str] = opt(
        None, "YAML config file (its `base:` files are merged first), or the name of a shipped config "
        "(mobilevit_tiny, quickstart, paper/table3_no_vbs: config/<name>.yaml of the package)", harmless=True
    )
    seed: int = opt(0, "random seed for python, numpy and torch", SEED)
    results_loc: str = opt("results", "folder that holds run folders", harmless=True)
    run_label: Optional[str] = opt(None, "run folder name; default: the config file's stem", harmless=True)
    resume: Optional[str] = opt(
        None, "'auto' (continue checkpoint_last.pt of the run folder), a checkpoint path, or 'restart' (discard "
        "the run folder's earlier records and checkpoints and train from scratch)", harmless=True
    )
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train; auto picks cuda when available", harmless=True)
    mixed_precision: Literal["none", "bf16", "fp16"] = opt("none", "autocast dtype on CUDA (fp16 adds a grad scaler)")
    channels_last: bool = opt(True, "channels_last memory format for model and inputs", harmless=True)
    compile: bool = opt(False, "wrap the model in torch.compile", harmless=True)
    grad_clip: Optional[float] = opt(None, "clip the gradient norm to this value; null = no clipping", POSITIVE)
    accum_freq: int = opt(1, "accumulate gradients over this many batches per optimizer step", AT_LEAST_1)
    log_every_batches: int = opt(50, "batches between log lines / metric reads", AT_LEAST_1, harmless=True)
    tensorboard: bool = opt(False, "also write TensorBoard scalars (needs the tensorboard extra)", harmless=True)
    sync_bn: bool = opt(False, "convert BatchNorm to SyncBatchNorm under DDP")
    max_batches_per_epoch: Optional[int] = opt(
        None, "stop each epoch after this many batches (debugging, smoke tests)", AT_LEAST_1
    )
    resume_allow_changes: Tuple[str, ...] = opt(
        (), "keys (e.g. optim.weight_decay,scheduler.max_epochs) a resume may change; any other change that "
        "alters the run is refused",
        harmless=True,
    )

    def check(self) -> None:
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise FieldError("mixed_precision", "fp16 needs CUDA; use bf16 or none on the CPU")
        if not self.resume_allow_changes:
            return
        # every leaf key and every section above one: a.b.c gives a, a.b and a.b.c
        known = {part for key, _, _ in iter_keys() for part in itertools.accumulate(key.split("."), "{}.{}".format)}
        for i, key in enumerate(self.resume_allow_changes):
            if key not in known:
                raise FieldError(f"resume_allow_changes[{i}]", f"{key!r} is not a config key or section"
                                 f"{did_you_mean(key, known)}")


# --------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class FakeDataConfig(Section):
    enable: bool = opt(False, "write a generated TinyImageNet-layout tree at dataset.root when it is missing")
    classes: int = opt(10, "classes of the generated tree", AT_LEAST_1)
    train_per_class: int = opt(100, "training images per class", AT_LEAST_1)
    val_per_class: int = opt(20, "validation images per class", AT_LEAST_1)
    test_per_class: int = opt(2, "test images per class", NON_NEGATIVE)
    seed: int = opt(0, "seed of the generator", SEED)


@dataclass(frozen=True)
class DatasetConfig(Section):
    name: Literal["tinyimagenet"] = opt("tinyimagenet", "dataset")
    root: str = opt("datasets/tiny-imagenet-200", "dataset folder (the archive's own layout)", harmless=True)
    download: bool = opt(False, "fetch the official archive when root is missing", harmless=True)
    archive: Optional[str] = opt(None, "unpack this local tiny-imagenet-200.zip when root is missing", harmless=True)
    cache: Literal["none", "memory", "disk"] = opt(
        "none", "where decoded pixels live: none decodes the JPEGs every epoch; memory / disk decode once into "
        "a uint8 array (disk: memory-mapped .npy, reused across runs)",
        harmless=True,
    )
    augment_on: Literal["auto", "workers", "device"] = opt(
        "auto", "where the batch augmentation runs: workers (DataLoader processes), device (the training device; "
        "with a cache the decoded split is held there too), auto = device when training on CUDA",
        harmless=True,
    )
    cache_dir: Optional[str] = opt(None, "folder of the disk cache (.npy per split); null = <root>/cache", harmless=True)
    skip_corrupt: bool = opt(False, "skip unreadable images with a warning instead of failing", harmless=True)
    workers: int = opt(2, "DataLoader worker processes (0 loads in the main process)", NON_NEGATIVE, harmless=True)
    persistent_workers: bool = opt(True, "keep workers alive between epochs", harmless=True)
    pin_memory: bool = opt(True, "pin host memory (CUDA only)", harmless=True)
    prefetch_factor: int = opt(2, "batches prefetched per worker", AT_LEAST_1, harmless=True)
    train_batch_size: int = opt(128, "batch size at the base crop size (per process)", BATCH)
    val_batch_size: int = opt(256, "validation batch size (per process)", BATCH, harmless=True)
    fake: FakeDataConfig = block(FakeDataConfig, "generated sample data")


# --------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class MixupConfig(Section):
    mixup_alpha: float = opt(0.0, "mixup Beta(alpha, alpha); 0 disables mixup", NON_NEGATIVE)
    cutmix_alpha: float = opt(0.0, "cutmix Beta(alpha, alpha); 0 disables cutmix", NON_NEGATIVE)
    prob: float = opt(1.0, "probability of mixing a batch", PROBABILITY)
    switch_prob: float = opt(0.5, "probability of cutmix instead of mixup when both are on", PROBABILITY)
    off_epochs: int = opt(
        0, "no mixup / cutmix in the last this many epochs of the run (the images and targets are left as "
        "they are; a fine-tuning phase on clean images)", NON_NEGATIVE
    )

    def check(self) -> None:
        if self.off_epochs and self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise FieldError("off_epochs", f"{self.off_epochs}, but mixup_alpha and cutmix_alpha are 0: there is no "
                             "mixing to switch off; set it to 0")


@dataclass(frozen=True)
class AugmentationConfig(Section):
    train: Tuple[Dict[str, Any], ...] = opt(
        freeze(
            (
                {"name": "random_resized_crop", "scale": [0.1, 1.0], "ratio": [0.75, 1.33], "interpolation": "bilinear"},
                {"name": "random_horizontal_flip"},
            )
        ),
        "training transforms, applied in order: a list of {name: ..., <its settings>} (main_train.py --help "
        "lists every transform and its settings)",
    )
    val: Tuple[Dict[str, Any], ...] = opt(
        freeze(({"name": "resize", "size": 72}, {"name": "center_crop", "size": 64})),
        "validation transforms (the paper: resize to crop + 8, center crop)",
    )
    mean: Optional[Tuple[float, ...]] = opt(
        None, "per-channel (R, G, B) mean to subtract, in [0, 1] pixel units; null feeds [0, 1] pixels", PROBABILITY
    )
    std: Optional[Tuple[float, ...]] = opt(
        None, "per-channel (R, G, B) std to divide by, in [0, 1] pixel units", FACTOR
    )
    mixup: MixupConfig = block(MixupConfig, "batch-level mixup / cutmix")

    def check(self) -> None:
        if (self.mean is None) != (self.std is None):
            given, other = ("mean", "std") if self.std is None else ("std", "mean")
            raise FieldError(given, f"{list(getattr(self, given))} is set but {other} is null; "
                             "give both (3 values each) or neither")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != 3:
                raise FieldError(name, f"{list(values)} must be 3 values (R, G, B)")


# --------------------------------------------------------------------------- sampler
@dataclass(frozen=True)
class VBSConfig(Section):
    min_crop_size: int = opt(58, "smallest candidate crop size", AT_LEAST_1)
    max_crop_size: int = opt(82, "largest candidate crop size", AT_LEAST_1)
    max_n_scales: int = opt(5, "number of sizes drawn from linspace(min, max)", SCALES)
    check_scale: int = opt(6, "crop sizes are rounded to a multiple of this", AT_LEAST_1)
    batch_rule: Literal["at_least_base", "constant_pixels"] = opt(
        "at_least_base", "batch size per crop size: at_least_base = max(B0, B0*64^2/(h*w)), the paper's cvnets v0.1 "
        "(batches grow below the base size, never shrink); constant_pixels = later cvnets' max(1, ...)"
    )

    def check(self) -> None:
        _check_order("min_crop_size", self.min_crop_size, "max_crop_size", self.max_crop_size)


@dataclass(frozen=True)
class SamplerConfig(Section):
    name: Literal["batch_sampler", "variable_batch_sampler"] = opt("batch_sampler", "batch sampler")
    crop_size: int = opt(64, "base training crop size", AT_LEAST_1)
    vbs: VBSConfig = block(VBSConfig, "variable batch sampler")


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class MobileViTConfig(Section):
    mode: Literal["xx_small", "x_small", "small", "tiny"] = opt("x_small", "variant (tiny = x_small, layers 3,4 removed, no fusion)")
    remove_layers: Optional[Tuple[int, ...]] = opt(
        None, "MobileViT layers to remove, any of 3,4,5; null = the mode's", Range(3, 5)
    )
    fusion: Optional[Literal["concat_conv", "none", "residual"]] = opt(None, "block fusion; null = the mode's")
    dropout: float = opt(0.1, "dropout inside the transformer blocks", RATE)
    attn_dropout: float = opt(0.0, "dropout on attention weights", RATE)
    ffn_dropout: float = opt(0.0, "dropout between the two FFN linears", RATE)
    num_heads: int = opt(4, "attention heads (must divide every transformer width)", AT_LEAST_1)


@dataclass(frozen=True)
class ResNetConfig(Section):
    depth: Literal[18, 34, 50] = opt(18, "ResNet depth")
    stem: Literal["cvnets", "imagenet", "cifar"] = opt(
        "cvnets", "cvnets: 3x3 s2 conv + 3x3 s2 depthwise; imagenet: 7x7 s2 + max-pool; cifar: 3x3 s1"
    )


@dataclass(frozen=True)
class InitConfig(Section):
    conv: Literal["kaiming_normal", "kaiming_uniform", "xavier_uniform", "normal"] = opt(
        "kaiming_normal", "conv weight init (fan_out); biases start at 0"
    )
    linear: Optional[Literal["trunc_normal", "normal", "xavier_uniform"]] = opt(
        None, "linear weight init; null = the family's (MobileViT trunc_normal, ResNet normal)"
    )
    linear_std: Optional[float] = opt(None, "std of normal/trunc_normal linear init; null = the family's", POSITIVE)


@dataclass(frozen=True)
class ModelConfig(Section):
    name: Literal["mobilevit", "resnet"] = opt("mobilevit", "model family")
    num_classes: Optional[int] = opt(None, "output classes; null = the dataset's", AT_LEAST_1)
    classifier_dropout: float = opt(0.1, "dropout before the classifier", RATE)
    checkpoint: Optional[str] = opt(
        None, "weights to load (main_eval, export, fine-tuning): a checkpoint of this tool, or a timm, "
        "torchvision, ml-cvnets or Hugging Face weights file (recognised by its keys; another class "
        "count re-initialises the classifier)", harmless=True
    )
    freeze: Literal["none", "backbone"] = opt(
        "none", "backbone: train the classifier alone (linear probing); the stages keep their weights and "
        "BatchNorm statistics and run in eval mode"
    )
    mobilevit: MobileViTConfig = block(MobileViTConfig, "MobileViT settings")
    resnet: ResNetConfig = block(ResNetConfig, "ResNet settings")
    init: InitConfig = block(InitConfig, "weight initialisation")


# --------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class DistillationConfig(Section):
    teacher: Optional[str] = opt(
        None, "checkpoint of this tool to distil from (checkpoint_best.pt of a finished run); its model is rebuilt "
        "from the config inside it and must have been trained on the same class list. A resume compares the "
        "weights' SHA-256, not the path, so the file may move", harmless=True
    )
    kind: Literal["soft", "hard"] = opt(
        "soft", "soft: KL divergence to the teacher's softened probabilities (x temperature^2); hard: cross entropy "
        "to the teacher's top class (DeiT's hard-label distillation)"
    )
    temperature: float = opt(1.0, "softmax temperature of both logits in the soft term (kind soft only)", POSITIVE)
    alpha: float = opt(
        0.5, "weight of the distillation term; the label cross entropy (with label_smoothing and mixup targets) "
        "gets 1 - alpha, so 0 is plain training", PROBABILITY
    )


@dataclass(frozen=True)
class LossConfig(Section):
    name: Literal["cross_entropy", "distillation"] = opt(
        "cross_entropy", "classification loss (distillation: cross entropy blended with a teacher's predictions)"
    )
    label_smoothing: float = opt(0.1, "label smoothing (training only; validation loss is plain)", RATE)
    distillation: DistillationConfig = block(DistillationConfig, "knowledge distillation settings")

    def check(self) -> None:
        if self.name == "distillation" and self.distillation.teacher is None:
            raise FieldError("distillation.teacher", "null, but loss.name is distillation: give the teacher's "
                             "checkpoint (e.g. results/beyond/teacher_resnet18_cifar/checkpoint_best.pt)")


# --------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class SGDConfig(Section):
    momentum: float = opt(0.9, "momentum", RATE)
    nesterov: bool = opt(False, "Nesterov momentum (needs momentum > 0)")

    def check(self) -> None:
        if self.nesterov and self.momentum == 0:
            raise FieldError("nesterov", "true needs momentum > 0 (momentum is 0)")


@dataclass(frozen=True)
class AdamConfig(Section):
    betas: Tuple[float, ...] = opt((0.9, 0.999), "beta1, beta2", RATE)
    eps: float = opt(1e-8, "denominator epsilon", POSITIVE)
    amsgrad: bool = opt(False, "AMSGrad variant")

    def check(self) -> None:
        if len(self.betas) != 2:
            raise FieldError("betas", f"{list(self.betas)} must be two numbers: beta1, beta2")


@dataclass(frozen=True)
class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = opt("adamw", "optimizer")
    weight_decay: float = opt(0.01, "weight decay", NON_NEGATIVE)
    no_decay_bn_filter_bias: bool = opt(False, "no weight decay on 1-D parameters (norms, biases)")
    sgd: SGDConfig = block(SGDConfig, "SGD settings")
    adam: AdamConfig = block(AdamConfig, "Adam settings")
    adamw: AdamConfig = block(AdamConfig, "AdamW settings")


# --------------------------------------------------------------------------- scheduler
class _MaxMinLR(Section):
    """Base of a schedule block with `max_lr` and `min_lr` fields: min_lr may not exceed max_lr."""

    def check(self) -> None:
        _check_order("min_lr", self.min_lr, "max_lr", self.max_lr)


@dataclass(frozen=True)
class CosineConfig(_MaxMinLR):
    max_lr: float = opt(0.002, "peak learning rate (after warmup)", NON_NEGATIVE)
    min_lr: float = opt(0.0002, "final learning rate", NON_NEGATIVE)


@dataclass(frozen=True)
class CyclicConfig(Section):
    min_lr: float = opt(0.1, "lowest LR of a cycle (and the warmup's target); a cycle's epochs run "
                        "min_lr, then epochs_per_cycle*min_lr falling linearly (the paper's code)", POSITIVE)
    epochs_per_cycle: int = opt(5, "epochs per cycle", AT_LEAST_1)
    total_cycles: int = opt(11, "cycles including the last one, which anneals to last_cycle_end_lr", AT_LEAST_1)
    last_cycle_end_lr: float = opt(1e-3, "LR at the end of the last cycle (at most min_lr)", NON_NEGATIVE)
    last_cycle_type: Literal["linear", "cosine"] = opt("linear", "shape of the last cycle")

    def check(self) -> None:
        _check_order("last_cycle_end_lr", self.last_cycle_end_lr, "min_lr", self.min_lr)


@dataclass(frozen=True)
class DivByTenConfig(_MaxMinLR):
    max_lr: float = opt(0.4, "learning rate before the first milestone", NON_NEGATIVE)
    min_lr: float = opt(2e-4, "floor", NON_NEGATIVE)
    milestones: Tuple[int, ...] = opt(
        (40, 80, 120), "epochs where the LR is multiplied by factor, increasing (epochs in both clock modes)",
        AT_LEAST_1,
    )
    factor: float = opt(0.1, "multiplier at each milestone", FACTOR)

    def check(self) -> None:
        super().check()
        steps = self.milestones
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                raise FieldError(f"milestones[{i}]", f"{steps[i]} must be larger than the one before ({steps[i - 1]})")


@dataclass(frozen=True)
class PlateauConfig(_MaxMinLR):
    max_lr: float = opt(0.4, "starting learning rate", NON_NEGATIVE)
    min_lr: float = opt(2e-4, "floor", NON_NEGATIVE)
    patience: int = opt(10, "epochs without improvement of the val metric before dividing", AT_LEAST_1)
    factor: float = opt(0.1, "multiplier on a plateau", FACTOR)
    threshold: float = opt(0.0, "the val metric must improve by more than this (absolute) to count", NON_NEGATIVE)


@dataclass(frozen=True)
class PolynomialConfig(_MaxMinLR):
    max_lr: float = opt(0.1, "starting learning rate", NON_NEGATIVE)
    min_lr: float = opt(1e-5, "final learning rate", NON_NEGATIVE)
    power: float = opt(2.5, "polynomial power", POSITIVE)


@dataclass(frozen=True)
class FixedConfig(Section):
    lr: float = opt(0.001, "constant learning rate", NON_NEGATIVE)


@dataclass(frozen=True)
class SchedulerConfig(Section):
    name: Literal["cosine", "cyclic", "div_by_ten", "plateau", "polynomial", "fixed"] = opt("cosine", "LR schedule")
    max_epochs: int = opt(200, "training epochs", EPOCHS)
    warmup_iterations: int = opt(3000, "linear warmup iterations (0 disables warmup)", NON_NEGATIVE)
    warmup_init_lr: float = opt(0.0002, "learning rate at iteration 0 of the warmup", NON_NEGATIVE)
    is_iteration_based: bool = opt(False, "cosine/polynomial progress per iteration, from the end of warmup to the run's last step, instead of per epoch (cyclic and div_by_ten count epochs either way)")
    cosine: CosineConfig = block(CosineConfig, "cosine settings")
    cyclic: CyclicConfig = block(CyclicConfig, "cyclic settings")
    div_by_ten: DivByTenConfig = block(DivByTenConfig, "step (divide-by-ten) settings")
    plateau: PlateauConfig = block(PlateauConfig, "divide on plateau settings")
    polynomial: PolynomialConfig = block(PolynomialConfig, "polynomial settings")
    fixed: FixedConfig = block(FixedConfig, "fixed LR settings")


# --------------------------------------------------------------------------- ema, stats, eval
@dataclass(frozen=True)
class EMAConfig(Section):
    enable: bool = opt(False, "keep an exponential moving average of the weights")
    momentum: float = opt(0.0005, "per-iteration momentum: ema = (1 - m) * ema + m * model", FACTOR)
    warmup: bool = opt(True, "start with a large momentum that decays to `momentum` (max(m, (1 + step)^-2/3), "
                       "as timm's EMA warmup); the paper's runs had none")


@dataclass(frozen=True)
class WandbConfig(Section):
    enable: bool = opt(False, "also log to Weights & Biases (needs the wandb extra); rank 0 only")
    project: str = opt("cvnets-tiny", "W&B project")
    entity: Optional[str] = opt(None, "W&B entity (user or team); null = the account's default")
    group: Optional[str] = opt(None, "W&B group; a sweep sets it to the sweep's name")
    tags: Tuple[str, ...] = opt((), "W&B tags of the run")
    mode: Literal["online", "offline"] = opt(
        "online", "offline writes the W&B run under <run folder>/wandb (or $WANDB_DIR) for a later `wandb sync`"
    )
    log_checkpoint: bool = opt(False, "upload the best checkpoint(s) as a model artifact when the run finishes")


@dataclass(frozen=True)
class MLflowConfig(Section):
    enable: bool = opt(False, "also log to MLflow (needs the mlflow extra); rank 0 only")
    tracking_uri: Optional[str] = opt(
        None, "MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, ...); null = $MLFLOW_TRACKING_URI or "
        "MLflow's default"
    )
    experiment: Optional[str] = opt(
        None, "MLflow experiment name, created when missing; a sweep sets it to the sweep's name; null = "
        "$MLFLOW_EXPERIMENT_NAME or MLflow's Default experiment"
    )
    log_checkpoint: bool = opt(False, "upload the best checkpoint(s) as run artifacts when the run finishes")


@dataclass(frozen=True)
class StatsConfig(Section):
    checkpoint_metric: Literal["top1", "top5", "loss"] = opt("top1", "val metric that picks checkpoint_best.pt")
    checkpoint_metric_max: bool = opt(True, "larger is better for checkpoint_metric")
    wandb: WandbConfig = block(WandbConfig, "Weights & Biases experiment tracking", harmless=True)
    mlflow: MLflowConfig = block(MLflowConfig, "MLflow experiment tracking", harmless=True)


@dataclass(frozen=True)
class EvalConfig(Section):
    split: Literal["val", "test"] = opt("val", "split to evaluate (test has no labels: writes predictions)")
    ema: bool = opt(False, "evaluate the EMA weights stored in the checkpoint")
    output_json: Optional[str] = opt(None, "also write the metrics to this JSON file")
    per_class: bool = opt(False, "print accuracy per class with its words.txt name")
    predictions_csv: Optional[str] = opt(None, "test split: where to write predictions (default beside the checkpoint)")
    image_size: Optional[int] = opt(
        None, "evaluate at N x N: resize to N + 8, center crop N (as the default val pipeline does at 64); "
        "null = image_augmentation.val of the run", AT_LEAST_1
    )


MIN_ONNX_OPSET = 18  # the torch.export-based exporter writes opset 18 and newer only


@dataclass(frozen=True)
class ExportConfig(Section):
    format: Literal["torchscript", "onnx"] = opt("torchscript", "artifact: TorchScript (traced) or ONNX (needs the export extra)")
    output: Optional[str] = opt(None, "artifact path; null = beside the checkpoint (<stem>.torchscript.pt / <stem>.onnx)")
    ema: bool = opt(False, "export the EMA weights stored in the checkpoint")
    batch_size: int = opt(1, "batch size of the example input (the fixed batch unless dynamic_batch)", AT_LEAST_1)
    dynamic_batch: bool = opt(False, "any batch size (ONNX: a symbolic batch axis)")
    dynamic_shape: bool = opt(False, "ONNX only: any height and width (>= 32), not just the crop size")
    verify: bool = opt(True, "compare the artifact's logits with the checkpoint model's before writing it")
    tolerance: float = opt(
        1e-3, "allowed |logit difference| in the verify check (relative once |logits| exceed 1)", NON_NEGATIVE
    )
    opset: int = opt(MIN_ONNX_OPSET, "ONNX opset (the torch.export-based exporter needs 18 or newer)", AT_LEAST_1)

    def check(self) -> None:
        if self.dynamic_shape and self.format != "onnx":
            raise FieldError("dynamic_shape", f"true needs format: onnx (format is {self.format}); a traced "
                             "TorchScript model keeps the input size it was traced at")
        if self.format == "onnx" and self.opset < MIN_ONNX_OPSET:
            raise FieldError("opset", f"{self.opset} is older than {MIN_ONNX_OPSET}, the oldest opset the "
                             f"torch.export-based ONNX exporter writes; use {MIN_ONNX_OPSET} or newer")


@dataclass(frozen=True)
class Config:
    common: CommonConfig = block(CommonConfig, "run settings")
    dataset: DatasetConfig = block(DatasetConfig, "dataset")
    image_augmentation: AugmentationConfig = block(AugmentationConfig, "augmentations")
    sampler: SamplerConfig = block(SamplerConfig, "batch sampler")
    model: ModelConfig = block(ModelConfig, "model")
    loss: LossConfig = block(LossConfig, "loss")
    optim: OptimConfig = block(OptimConfig, "optimizer")
    scheduler: SchedulerConfig = block(SchedulerConfig, "learning-rate schedule")
    ema: EMAConfig = block(EMAConfig, "weight EMA")
    stats: StatsConfig = block(StatsConfig, "checkpoint selection and experiment trackers")
    eval: EvalConfig = block(EvalConfig, "main_eval.py settings", harmless=True)
    export: ExportConfig = block(ExportConfig, "main_export.py settings", harmless=True)


# --------------------------------------------------------------------------- schema walking
def iter_keys(cls: type = Config, prefix: str = "") -> Iterator[Tuple[str, Any, dataclasses.Field]]:
    """Yield (dotted key, type, field) for every leaf of the schema."""
    types = hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = types[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, key + ".")
        else:
            yield key, tp, f


def _walk(key: str) -> Iterator[Tuple[dataclasses.Field, Any]]:
    """(field, type) of each part of a dotted key, outermost first; KeyError at the first unknown part."""
    cls: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in hints(cls):
            raise KeyError(f"{key!r} is not a key of options/schema.py")
        f = next(f for f in dataclasses.fields(cls) if f.name == part)
        cls = hints(cls)[part]
        yield f, cls


def field_type(key: str) -> Any:
    """The schema type of a dotted leaf key (`optim.name` -> Literal[...]); KeyError if unknown."""
    *_, (_, tp) = _walk(key)
    return tp


def harmless_on_resume(key: str) -> bool:
    """Whether a resume may change `key` (a dotted leaf) without changing what the run computes."""
    try:  # a harmless section makes every key under it harmless, known or not
        return any(f.metadata.get("harmless") for f, _ in _walk(key))
    except KeyError:
        return False


def non_null(tp: Any) -> Any:
    """X for Optional[X], else `tp` itself."""
    if typing.get_origin(tp) is Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def literal_choices(key: str) -> Tuple[Any, ...]:
    """The allowed values of a Literal key (Optional[Literal] included)."""
    tp = non_null(field_type(key))
    if typing.get_origin(tp) is not Literal:
        raise KeyError(f"{key!r} is not a Literal key of options/schema.py")
    return typing.get_args(tp)
