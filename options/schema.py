"""Every configuration key, its type, its default and a one-line description.

This file is the single place where defaults live. Sections are frozen dataclasses;
``name`` fields are ``Literal`` choices and a block named after each choice holds
that entry's own settings (``optim.name: adamw`` reads ``optim.adamw.*``).

Types understood by the loader (options/config.py): int, float, bool, str,
Literal[...], Optional[X], Tuple[X, ...] (written as lists in YAML) and
Tuple[Dict[str, Any], ...] for augmentation lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Literal, Mapping, Optional, Tuple


def freeze(value: Any) -> Any:
    """Deep read-only copy of plain YAML data (dicts -> mappingproxy, lists -> tuples)."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def opt(default: Any, help: str, **metadata: Any):
    """A dataclass field with a default and a one-line description for --help."""
    return field(default=default, metadata={"help": help, **metadata})


def block(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------- common
@dataclass(frozen=True)
class CommonConfig:
    config_file: Optional[str] = opt(None, "YAML config file (its `base:` files are merged first)")
    seed: int = opt(0, "random seed for python, numpy and torch")
    results_loc: str = opt("results", "folder that holds run folders")
    run_label: Optional[str] = opt(None, "run folder name; default: the config file's stem")
    resume: Optional[str] = opt(None, "'auto' (continue checkpoint_last.pt of the run folder) or a checkpoint path")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train; auto picks cuda when available")
    mixed_precision: Literal["none", "bf16", "fp16"] = opt("none", "autocast dtype on CUDA (fp16 adds a grad scaler)")
    channels_last: bool = opt(True, "channels_last memory format for model and inputs")
    compile: bool = opt(False, "wrap the model in torch.compile")
    grad_clip: Optional[float] = opt(None, "clip the gradient norm to this value")
    accum_freq: int = opt(1, "accumulate gradients over this many batches per optimizer step")
    log_freq: int = opt(50, "iterations between log lines / metric reads")
    tensorboard: bool = opt(False, "also write TensorBoard scalars (needs the tensorboard extra)")
    sync_bn: bool = opt(False, "convert BatchNorm to SyncBatchNorm under DDP")
    max_iterations_per_epoch: Optional[int] = opt(None, "stop each epoch after this many iterations (debugging)")


# --------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class FakeDataConfig:
    enable: bool = opt(False, "write a generated TinyImageNet-layout tree at dataset.root when it is missing")
    classes: int = opt(10, "classes of the generated tree")
    train_per_class: int = opt(100, "training images per class")
    val_per_class: int = opt(20, "validation images per class")
    test_per_class: int = opt(2, "test images per class")
    seed: int = opt(0, "seed of the generator")


@dataclass(frozen=True)
class DatasetConfig:
    name: Literal["tinyimagenet"] = opt("tinyimagenet", "dataset")
    root: str = opt("datasets/tiny-imagenet-200", "dataset folder (the archive's own layout)")
    download: bool = opt(False, "fetch the official archive when root is missing")
    archive: Optional[str] = opt(None, "unpack this local tiny-imagenet-200.zip when root is missing")
    cache: Literal["none", "memory", "disk", "gpu"] = opt(
        "none", "decode images once into uint8 arrays (memory, disk); gpu: the whole split on the training "
        "device (staged through the disk cache), augmented there in batches, no workers"
    )
    cache_dir: Optional[str] = opt(None, "folder of the disk cache (.npy per split); null = <root>/cache")
    skip_corrupt: bool = opt(False, "skip unreadable images with a warning instead of failing")
    workers: int = opt(2, "DataLoader worker processes (0 loads in the main process)")
    persistent_workers: bool = opt(True, "keep workers alive between epochs")
    pin_memory: bool = opt(True, "pin host memory (CUDA only)")
    prefetch_factor: int = opt(2, "batches prefetched per worker")
    train_batch_size: int = opt(128, "batch size at the base crop size (per process)")
    val_batch_size: int = opt(256, "validation batch size (per process)")
    fake: FakeDataConfig = block(FakeDataConfig, "generated sample data")


# --------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class MixupConfig:
    mixup_alpha: float = opt(0.0, "mixup Beta(alpha, alpha); 0 disables mixup")
    cutmix_alpha: float = opt(0.0, "cutmix Beta(alpha, alpha); 0 disables cutmix")
    prob: float = opt(1.0, "probability of mixing a batch")
    switch_prob: float = opt(0.5, "probability of cutmix instead of mixup when both are on")


@dataclass(frozen=True)
class AugmentationConfig:
    train: Tuple[Dict[str, Any], ...] = opt(
        freeze(
            (
                {"name": "random_resized_crop", "scale": [0.1, 1.0], "ratio": [0.75, 1.33], "interpolation": "bilinear"},
                {"name": "random_horizontal_flip"},
            )
        ),
        "training transforms, applied in order: a list of {name: ..., <its settings>}",
    )
    val: Tuple[Dict[str, Any], ...] = opt(
        freeze(({"name": "resize", "size": 72}, {"name": "center_crop", "size": 64})),
        "validation transforms (the paper: resize to crop + 8, center crop)",
    )
    mean: Optional[Tuple[float, ...]] = opt(None, "per-channel mean to subtract; null feeds [0, 1] pixels")
    std: Optional[Tuple[float, ...]] = opt(None, "per-channel std to divide by")
    mixup: MixupConfig = block(MixupConfig, "batch-level mixup / cutmix")


# --------------------------------------------------------------------------- sampler
@dataclass(frozen=True)
class VBSConfig:
    min_crop_size: int = opt(58, "smallest candidate crop size")
    max_crop_size: int = opt(82, "largest candidate crop size")
    max_n_scales: int = opt(5, "number of sizes drawn from linspace(min, max)")
    check_scale: int = opt(6, "crop sizes are rounded to a multiple of this")


@dataclass(frozen=True)
class SamplerConfig:
    name: Literal["batch_sampler", "variable_batch_sampler"] = opt("batch_sampler", "batch sampler")
    crop_size: int = opt(64, "base training crop size")
    vbs: VBSConfig = block(VBSConfig, "variable batch sampler")


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class MobileViTConfig:
    mode: Literal["xx_small", "x_small", "small", "tiny"] = opt("x_small", "variant (tiny = x_small, layers 3,4 removed, no fusion)")
    remove_layers: Optional[Tuple[int, ...]] = opt(None, "MobileViT layers to remove, any of 3,4,5; null = the mode's")
    fusion: Optional[Literal["concat_conv", "none", "residual"]] = opt(None, "block fusion; null = the mode's")
    dropout: float = opt(0.1, "dropout inside the transformer blocks")
    attn_dropout: float = opt(0.0, "dropout on attention weights")
    ffn_dropout: float = opt(0.0, "dropout between the two FFN linears")
    num_heads: int = opt(4, "attention heads")


@dataclass(frozen=True)
class ResNetConfig:
    depth: Literal[18, 34, 50] = opt(18, "ResNet depth")
    stem: Literal["cvnets", "imagenet", "cifar"] = opt(
        "cvnets", "cvnets: 3x3 s2 conv + 3x3 s2 depthwise; imagenet: 7x7 s2 + max-pool; cifar: 3x3 s1"
    )


@dataclass(frozen=True)
class InitConfig:
    conv: Literal["kaiming_normal", "kaiming_uniform", "xavier_uniform", "normal"] = opt(
        "kaiming_normal", "conv weight init (fan_out); biases start at 0"
    )
    linear: Optional[Literal["trunc_normal", "normal", "xavier_uniform"]] = opt(
        None, "linear weight init; null = the family's (MobileViT trunc_normal, ResNet normal)"
    )
    linear_std: Optional[float] = opt(None, "std of normal/trunc_normal linear init; null = the family's")


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["mobilevit", "resnet"] = opt("mobilevit", "model family")
    num_classes: Optional[int] = opt(None, "output classes; null = the dataset's")
    classifier_dropout: float = opt(0.1, "dropout before the classifier")
    checkpoint: Optional[str] = opt(None, "weights to load (main_eval, export, fine-tuning)")
    mobilevit: MobileViTConfig = block(MobileViTConfig, "MobileViT settings")
    resnet: ResNetConfig = block(ResNetConfig, "ResNet settings")
    init: InitConfig = block(InitConfig, "weight initialisation")


# --------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class LossConfig:
    name: Literal["cross_entropy"] = opt("cross_entropy", "classification loss")
    label_smoothing: float = opt(0.1, "label smoothing (training only; validation loss is plain)")


# --------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class SGDConfig:
    momentum: float = opt(0.9, "momentum")
    nesterov: bool = opt(False, "Nesterov momentum")


@dataclass(frozen=True)
class AdamConfig:
    betas: Tuple[float, ...] = opt((0.9, 0.999), "beta1, beta2")
    eps: float = opt(1e-8, "denominator epsilon")
    amsgrad: bool = opt(False, "AMSGrad variant")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = opt("adamw", "optimizer")
    weight_decay: float = opt(0.01, "weight decay")
    no_decay_bn_filter_bias: bool = opt(False, "no weight decay on 1-D parameters (norms, biases)")
    sgd: SGDConfig = block(SGDConfig, "SGD settings")
    adam: AdamConfig = block(AdamConfig, "Adam settings")
    adamw: AdamConfig = block(AdamConfig, "AdamW settings")


# --------------------------------------------------------------------------- scheduler
@dataclass(frozen=True)
class CosineConfig:
    max_lr: float = opt(0.002, "peak learning rate (after warmup)")
    min_lr: float = opt(0.0002, "final learning rate")


@dataclass(frozen=True)
class CyclicConfig:
    max_lr: float = opt(0.1, "learning rate at the start of each sweep")
    min_lr: float = opt(1e-4, "learning rate at the end of each sweep")
    cycles: int = opt(5, "number of high-to-low sweeps over the run")


@dataclass(frozen=True)
class DivByTenConfig:
    max_lr: float = opt(0.4, "learning rate before the first milestone")
    min_lr: float = opt(2e-4, "floor")
    milestones: Tuple[int, ...] = opt((40, 60, 80), "epochs where the LR is multiplied by factor (epochs in both clock modes)")
    factor: float = opt(0.1, "multiplier at each milestone")


@dataclass(frozen=True)
class PlateauConfig:
    max_lr: float = opt(0.4, "starting learning rate")
    min_lr: float = opt(2e-4, "floor")
    patience: int = opt(10, "epochs without improvement of the val metric before dividing")
    factor: float = opt(0.1, "multiplier on a plateau")
    threshold: float = opt(0.0, "the val metric must improve by more than this (absolute) to count")


@dataclass(frozen=True)
class PolynomialConfig:
    max_lr: float = opt(0.1, "starting learning rate")
    min_lr: float = opt(1e-5, "final learning rate")
    power: float = opt(2.5, "polynomial power")


@dataclass(frozen=True)
class FixedConfig:
    lr: float = opt(0.001, "constant learning rate")


@dataclass(frozen=True)
class SchedulerConfig:
    name: Literal["cosine", "cyclic", "div_by_ten", "plateau", "polynomial", "fixed"] = opt("cosine", "LR schedule")
    max_epochs: int = opt(200, "training epochs")
    warmup_iterations: int = opt(3000, "linear warmup iterations (0 disables warmup)")
    warmup_init_lr: float = opt(0.0002, "learning rate at iteration 0 of the warmup")
    is_iteration_based: bool = opt(False, "cosine/cyclic/polynomial progress per iteration, decaying from the end of warmup, instead of per epoch")
    cosine: CosineConfig = block(CosineConfig, "cosine settings")
    cyclic: CyclicConfig = block(CyclicConfig, "cyclic settings")
    div_by_ten: DivByTenConfig = block(DivByTenConfig, "step (divide-by-ten) settings")
    plateau: PlateauConfig = block(PlateauConfig, "divide on plateau settings")
    polynomial: PolynomialConfig = block(PolynomialConfig, "polynomial settings")
    fixed: FixedConfig = block(FixedConfig, "fixed LR settings")


# --------------------------------------------------------------------------- ema, stats, eval
@dataclass(frozen=True)
class EMAConfig:
    enable: bool = opt(False, "keep an exponential moving average of the weights")
    momentum: float = opt(0.0005, "per-iteration momentum: ema = (1 - m) * ema + m * model")


@dataclass(frozen=True)
class StatsConfig:
    checkpoint_metric: Literal["top1", "top5", "loss"] = opt("top1", "val metric that picks checkpoint_best.pt")
    checkpoint_metric_max: bool = opt(True, "larger is better for checkpoint_metric")


@dataclass(frozen=True)
class EvalConfig:
    split: Literal["val", "test"] = opt("val", "split to evaluate (test has no labels: writes predictions)")
    ema: bool = opt(False, "evaluate the EMA weights stored in the checkpoint")
    output_json: Optional[str] = opt(None, "also write the metrics to this JSON file")
    per_class: bool = opt(False, "print accuracy per class with its words.txt name")
    predictions_csv: Optional[str] = opt(None, "test split: where to write predictions (default beside the checkpoint)")


@dataclass(frozen=True)
class ExportConfig:
    format: Literal["torchscript", "onnx"] = opt("torchscript", "artifact: TorchScript (traced) or ONNX (needs the export extra)")
    output: Optional[str] = opt(None, "artifact path; null = beside the checkpoint (<stem>.torchscript.pt / <stem>.onnx)")
    ema: bool = opt(False, "export the EMA weights stored in the checkpoint")
    batch_size: int = opt(1, "batch size of the example input (the fixed batch unless dynamic_batch)")
    dynamic_batch: bool = opt(False, "any batch size (ONNX: a symbolic batch axis)")
    dynamic_shape: bool = opt(False, "ONNX only: any height and width (>= 32), not just the crop size")
    verify: bool = opt(True, "compare the artifact's logits with the checkpoint model's before writing it")
    tolerance: float = opt(1e-3, "allowed |logit difference| in the verify check (relative once |logits| exceed 1)")
    opset: int = opt(18, "ONNX opset (the torch.export-based exporter needs 18 or newer)")


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
    stats: StatsConfig = block(StatsConfig, "checkpoint selection")
    eval: EvalConfig = block(EvalConfig, "main_eval.py settings")
    export: ExportConfig = block(ExportConfig, "main_export.py settings")
