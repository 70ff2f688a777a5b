"""Weights of other libraries: reading their files and mapping their tensors onto this project's models.

Four key layouts are understood, for the models that are the same network here:

- ``timm``: timm's ``mobilevit_xxs/xs/s`` (ByobNet) and ``resnet18/34/50``;
- ``torchvision``: torchvision's ``resnet18/34/50`` (the same keys as timm's ResNets);
- ``cvnets``: Apple's ml-cvnets MobileViT v1 and ResNet (v0.1, the paper's fork, and later);
- ``hf``: Hugging Face transformers' ``MobileViTForImageClassification`` (separate query, key and
  value projections, fused here into one ``qkv``).

The mapping is exact in both directions: every tensor of the file is used once, every tensor of the
model is filled once, shapes must agree; otherwise `WeightMappingError` names the first unmatched
key on each side. Only BatchNorm's ``num_batches_tracked`` counters may be absent from a file
(some hubs strip them; they never change the logits): the model keeps its own.

Files are read without running code: safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from cvnets.export import MissingExtraError
from cvnets.mobilevit import HEAD_EXPANSION, HEAD_MAX_CHANNELS, VARIANTS, ViTLayer, removed_layers
from options.schema import ModelConfig
from utils.files import atomic_write_bytes

FORMATS = ("timm", "torchvision", "cvnets", "hf")
COUNTER = "num_batches_tracked"
TIMM_HEADS = 4  # timm's MobileVitBlock default, which its MobileViT v1 models keep
CLASSIFIER = "classifier.1."  # this project's linear layer (classifier.0 is the dropout)
# Where trainers of other libraries keep the weights inside a checkpoint dict (timm's and
# torchvision's training scripts, ml-cvnets' training checkpoints, Lightning-style files).
WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
SAFETENSORS_HINT = "pip install safetensors (or pip install -e '.[pretrained]')"

StateDict = Dict[str, Tensor]
Places = Dict[str, Tuple[str, ...]]  # our module path -> the file's module path(s), concatenated on dim 0


class WeightMappingError(ValueError):
    """A file whose tensors do not map exactly onto the model; the one-line message names the keys."""


# ----------------------------------------------------------------------------- reading files
def read_state_dict(path: str) -> StateDict:
    """The tensors of a weights file of any supported library, without running code from it."""
    if not os.path.isfile(path):
        raise WeightMappingError(f"weights file not found: {path}; check the path")
    if path.endswith(".safetensors"):
        load_file = _safetensors("reading", path).load_file
        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:  # header or size problems
            raise WeightMappingError(f"cannot read {path} as safetensors ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightMappingError(f"refused to load {path}: it holds Python objects besides tensors and plain "
                                 "data, and this tool never runs code from a file; save its state_dict() "
                                 "or a .safetensors file instead") from None
    except Exception as e:  # truncated, not a torch file, ...
        raise WeightMappingError(f"cannot read {path} ({type(e).__name__}); is it a complete PyTorch "
                                 "or safetensors weights file?") from None
    return unwrap(state, path)


def unwrap(state: object, path: str) -> StateDict:
    """The flat name -> tensor dict inside a loaded file (a bare state dict or a trainer's checkpoint)."""
    if isinstance(state, Mapping) and not _all_tensors(state):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), Mapping) and _all_tensors(state[k])),
                     None)
        if inner is None:
            raise WeightMappingError(f"{path} holds no state dict (a mapping of names to tensors), "
                                     f"neither at the top nor under {', '.join(WRAPPERS)}")
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise WeightMappingError(f"{path} holds no state dict (a mapping of names to tensors)")
    state = dict(state)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _safetensors(doing: str, path: str):
    """The safetensors.torch module, or MissingExtraError naming the install command."""
    try:
        import safetensors.torch
    except ImportError:
        raise MissingExtraError(f"{doing} {path} needs the safetensors package: {SAFETENSORS_HINT}") from None
    return safetensors.torch


def _all_tensors(state: Mapping) -> bool:
    return bool(state) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())


def detect_format(state: Mapping[str, Tensor]) -> Tuple[str, str]:
    """(format, family) of a foreign state dict, recognised by its keys; WeightMappingError if unknown."""
    keys = set(state)
    if any(k.startswith("mobilevit.encoder.") for k in keys):
        return "hf", "mobilevit"
    if "stem.conv.weight" in keys and "final_conv.conv.weight" in keys:
        return "timm", "mobilevit"
    if "conv_1.block.conv.weight" in keys:
        return "cvnets", "resnet" if "layer_1.block.conv.weight" in keys else "mobilevit"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision", "resnet"  # timm's ResNets have the same keys
    if any(k.startswith("stages.stem.") for k in keys):
        raise WeightMappingError("this is already this project's key layout: give it to --model.checkpoint "
                                 "as it is, or convert it with --to timm|hf")
    raise WeightMappingError(f"unknown key layout (first key {sorted(keys)[0]!r}); give --format one of "
                             f"{', '.join(FORMATS)} (MobileViT v1 or ResNet-18/34/50 weights)")


# ----------------------------------------------------------------------------- layouts
# Names of the three convolutions of an inverted residual (expand, depthwise, reduce) and the
# conv / norm inside a conv-norm-act unit, per format.
_MV2 = {"timm": ("conv1_1x1", "conv2_kxk", "conv3_1x1"), "cvnets": ("exp_1x1", "conv_3x3", "red_1x1"),
        "hf": ("expand_1x1", "conv_3x3", "reduce_1x1")}
_UNIT = {"timm": ("conv", "bn"), "cvnets": ("block.conv", "block.norm"), "hf": ("convolution", "normalization")}
# Inside a transformer block: ours -> timm / ml-cvnets / HF ("qkv" is three modules in HF).
_TRANSFORMER = {
    "norm_attn": ("norm1", "pre_norm_mha.0", "layernorm_before"),
    "attn.qkv": ("attn.qkv", "pre_norm_mha.1.qkv_proj",
                 ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
    "attn.out_proj": ("attn.proj", "pre_norm_mha.1.out_proj", "attention.output.dense"),
    "norm_ffn": ("norm2", "pre_norm_ffn.0", "layernorm_after"),
    "ffn.0": ("mlp.fc1", "pre_norm_ffn.1", "intermediate.dense"),
    "ffn.3": ("mlp.fc2", "pre_norm_ffn.4", "output.dense"),
}
_COLUMN = {"timm": 0, "cvnets": 1, "hf": 2}
# MobileViT block parts outside the transformer: ours -> (timm, ml-cvnets, HF)
_VIT_PARTS = {"local.0": ("conv_kxk", "local_rep.conv_3x3", "conv_kxk"),
              "local.1": ("conv_1x1", "local_rep.conv_1x1", "conv_1x1"),
              "proj": ("conv_proj", "conv_proj", "conv_projection"),
              "fuse": ("conv_fusion", "fusion", "fusion")}


def _unit(fmt: str, prefix: str, part: str) -> str:
    """A conv-norm-act unit's conv or norm (`part`) under `prefix` in the file's layout."""
    return f"{prefix}.{_UNIT[fmt][0 if part == 'conv' else 1]}"


def _mobilevit_place(fmt: str, module: str, transformer_blocks: Mapping[int, int]) -> Optional[Tuple[str, ...]]:
    """The file's module path(s) for one of our MobileViT modules (path without the parameter name);
    `transformer_blocks`: the MobileViT layers' numbers -> their transformer blocks."""
    col = _COLUMN[fmt]
    root = {"timm": "", "cvnets": "", "hf": "mobilevit."}[fmt]
    m = re.fullmatch(r"stages\.(stem|head)\.(conv|norm)", module)
    if m:
        name = {"stem": ("stem", "conv_1", "conv_stem"), "head": ("final_conv", "conv_1x1_exp", "conv_1x1_exp")}
        return (_unit(fmt, root + name[m[1]][col], m[2]),)
    if module == "classifier.1":
        return (("head.fc", "classifier.fc", "classifier")[col],)
    m = re.fullmatch(r"stages\.layer(\d)\.(\d+)\.(.+)", module)
    if not m:
        return None
    layer, index, rest = int(m[1]), int(m[2]), m[3]
    stage = {"timm": f"stages.{layer - 1}", "cvnets": f"layer_{layer}",
             "hf": f"mobilevit.encoder.layer.{layer - 1}"}[fmt]
    m = re.fullmatch(r"block\.(\d)\.(conv|norm)", rest)
    if m:  # an inverted residual: the MV2 stages' blocks, or the strided one opening a MobileViT layer
        if fmt == "hf":
            block = f"{stage}.downsampling_layer" if layer in transformer_blocks else f"{stage}.layer.{index}"
        else:
            block = f"{stage}.{index}" + (".block" if fmt == "cvnets" else "")
        return (_unit(fmt, f"{block}.{_MV2[fmt][int(m[1])]}", m[2]),)
    vit = {"timm": f"{stage}.1", "cvnets": f"{stage}.1", "hf": stage}[fmt]
    m = re.fullmatch(r"(local\.\d|proj|fuse)\.(conv|norm)", rest)
    if m and index == 1:
        if fmt == "timm" and m[1] == "local.1":  # timm's 1x1 conv to the transformer width is a bare conv
            return (f"{vit}.conv_1x1",)
        return (_unit(fmt, f"{vit}.{_VIT_PARTS[m[1]][col]}", m[2]),)
    m = re.fullmatch(r"transformer\.(\d+)(?:\.(.+))?", rest)
    if m and index == 1:
        blocks = {"timm": f"{vit}.transformer", "cvnets": f"{vit}.global_rep", "hf": f"{vit}.transformer.layer"}[fmt]
        j = int(m[1])
        if m[2] is None and j == transformer_blocks[layer]:  # the LayerNorm after the last block
            return ((f"{vit}.norm", f"{vit}.global_rep.{j}", f"{vit}.layernorm")[col],)
        names = _TRANSFORMER.get(m[2] or "")
        if names is None:
            return None
        name = names[col]
        return tuple(f"{blocks}.{j}.{n}" for n in name) if isinstance(name, tuple) else (f"{blocks}.{j}.{name}",)
    return None


def _resnet_place(fmt: str, module: str, convs: int) -> Optional[Tuple[str, ...]]:
    """The file's module path for one of our ResNet modules (timm/torchvision or ml-cvnets layout);
    `convs`: convolutions per residual branch (2 basic, 3 bottleneck)."""
    cvnets = fmt == "cvnets"
    if module == "classifier.1":
        return ("classifier.classifier_fc" if cvnets else "fc",)
    m = re.fullmatch(r"stages\.stem\.(\d)\.(conv|norm)", module)
    if m:
        if cvnets:  # 3x3 strided conv, then the strided depthwise conv in the max-pool's place
            return (f"{('conv_1', 'layer_1')[int(m[1])]}.block.{m[2]}",)
        return (("conv1", "bn1")[m[2] == "norm"],) if m[1] == "0" else None
    m = re.fullmatch(r"stages\.layer(\d)\.(\d+)\.(residual\.(\d)|shortcut)\.(conv|norm)", module)
    if not m:
        return None
    layer, index, conv, part = int(m[1]), int(m[2]), m[4], m[5]
    if cvnets:
        block = f"layer_{layer + 1}.block_{index}"
        if conv is None:
            return (f"{block}.down_sample.block.{part}",)
        # conv_batch_act_1 (, conv_batch_act_2), then conv_batch_2 (or _3) without activation
        unit = f"conv_batch_{convs}" if int(conv) == convs - 1 else f"conv_batch_act_{int(conv) + 1}"
        return (f"{block}.block.{unit}.block.{part}",)
    block = f"layer{layer}.{index}"
    if conv is None:
        return (f"{block}.downsample.{'0' if part == 'conv' else '1'}",)
    return (f"{block}.{'conv' if part == 'conv' else 'bn'}{int(conv) + 1}",)


def places(fmt: str, cfg: ModelConfig, own: Mapping[str, Tensor]) -> Places:
    """Where each of our modules' tensors lives in a file of format `fmt` (module paths)."""
    if fmt not in FORMATS:
        raise WeightMappingError(f"--format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    modules = sorted({k.rsplit(".", 1)[0] for k in own})
    result: Places = {}
    if cfg.name == "mobilevit":
        if fmt == "torchvision":
            raise WeightMappingError("torchvision has no MobileViT; its ResNets map onto model.name resnet")
        _check_mobilevit(fmt, cfg)
        layers = enumerate(VARIANTS[cfg.mobilevit.mode].layers, start=1)
        depth = {i: spec.blocks for i, spec in layers if isinstance(spec, ViTLayer)}
        place: Callable[[str], Optional[Tuple[str, ...]]] = lambda m: _mobilevit_place(fmt, m, depth)
    else:
        _check_resnet_stem(fmt, cfg.resnet.stem)
        convs = 3 if cfg.resnet.depth == 50 else 2
        place = lambda m: _resnet_place(fmt, m, convs)
    for module in modules:
        found = place(module)
        if found is None:
            raise WeightMappingError(f"no {fmt} name known for this model's {module}")
        result[module] = found
    return result


def _check_mobilevit(fmt: str, cfg: ModelConfig) -> None:
    """The other libraries build the full network with fusion, and timm always uses 4 heads."""
    knobs = cfg.mobilevit
    if removed_layers(knobs) or (knobs.fusion or VARIANTS[knobs.mode].fusion) != "concat_conv":
        raise WeightMappingError(f"{fmt} has no MobileViT {knobs.mode} without layers or fusion; use mode "
                                 "xx_small, x_small or small with remove_layers null and fusion concat_conv")
    if fmt == "timm" and knobs.num_heads != TIMM_HEADS:
        raise WeightMappingError(f"model.mobilevit.num_heads: {knobs.num_heads}, but timm's MobileViT has "
                                 f"{TIMM_HEADS} heads; set --model.mobilevit.num-heads {TIMM_HEADS}")


def _check_resnet_stem(fmt: str, stem: str) -> None:
    wanted = "cvnets" if fmt == "cvnets" else "imagenet"
    if stem != wanted:
        source = "ml-cvnets' ResNet" if fmt == "cvnets" else "timm's and torchvision's ResNets"
        raise WeightMappingError(f"model.resnet.stem: {stem} is not the stem of {source}; "
                                 f"set --model.resnet.stem {wanted}")


# ----------------------------------------------------------------------------- mapping
def to_project(fmt: str, cfg: ModelConfig, own: Mapping[str, Tensor], source: Mapping[str, Tensor],
               classifier_may_differ: bool = False) -> Tuple[StateDict, List[str]]:
    """(weights for our model, our keys left as they are) from a foreign state dict.

    `own` is our model's state dict (names and shapes). With `classifier_may_differ`, a
    classifier of another class count is not an error: its keys are returned as left alone
    (fine-tuning); every other difference is a WeightMappingError.
    """
    where = places(fmt, cfg, own)
    result: StateDict = {}
    kept: List[str] = []
    used = set()
    missing = []
    for key, target in own.items():
        module, param = key.rsplit(".", 1)
        names = [f"{m}.{param}" for m in where[module]]
        if not all(n in source for n in names):
            if param == COUNTER and not any(n in source for n in names):
                kept.append(key)
                continue
            missing.append((key, next(n for n in names if n not in source)))
            continue
        used.update(names)
        value = torch.cat([source[n] for n in names]) if len(names) > 1 else source[names[0]]
        if value.shape != target.shape:
            if classifier_may_differ and key.startswith(CLASSIFIER):
                kept.append(key)
                continue
            shown = names[0] if len(names) == 1 else "+".join(names)
            raise WeightMappingError(f"shape mismatch: the file's {shown} is {tuple(value.shape)}, the model's "
                                     f"{key} is {tuple(target.shape)}; {_shape_hint(cfg)}")
        result[key] = value.to(target.dtype).clone()
    extra = sorted(set(source) - used)
    if missing or extra:
        ours = f"model key {missing[0][0]} (looked for {missing[0][1]}) is not in the file" if missing else \
            "every model key is filled"
        theirs = f"file key {extra[0]} has no place in the model" if extra else "every file key is used"
        counts = f"{len(missing)} model key(s) unfilled, {len(extra)} file key(s) unused"
        raise WeightMappingError(f"the {fmt} weights do not map exactly onto {_describe(cfg)}: {ours}; "
                                 f"{theirs} ({counts}); {_shape_hint(cfg)}")
    return result, kept


def import_model(fmt: str, cfg: ModelConfig, state: Mapping[str, Tensor], num_classes: Optional[int] = None,
                 input_order: str = "rgb") -> Tuple[nn.Module, List[str]]:
    """Our model (in eval mode) holding a foreign state dict's weights, and report lines.

    The classifier keeps the file's class count, unless `num_classes` asks for another: then it
    keeps its fresh initialisation. input_order "bgr": the file's network was trained on BGR
    images; its stem is flipped to read RGB (see `flip_stem_channels`).
    """
    from cvnets import build_model

    probe = build_model(cfg, 1).state_dict()
    head = places(fmt, cfg, probe)["classifier.1"][0] + ".weight"
    classes = int(state[head].shape[0]) if head in state else 1  # no head: to_project names it below
    model = build_model(cfg, classes)
    weights, kept = to_project(fmt, cfg, model.state_dict(), state)
    if input_order == "bgr":
        flip_stem_channels(weights, cfg)
    model.load_state_dict({**model.state_dict(), **weights})
    lines = [f"{fmt} layout: {len(state)} tensors mapped onto {len(weights)} of the model's {len(model.state_dict())}"
             + (f" ({len(kept)} BatchNorm counters absent from the file: left at 0)" if kept else "")]
    if num_classes is not None and num_classes != classes:
        fresh = build_model(cfg, num_classes)
        fresh.stages.load_state_dict(model.stages.state_dict())
        model = fresh
        lines.append(f"classifier re-initialised for {num_classes} classes (the file has {classes})")
    return model.eval(), lines


def from_project(fmt: str, cfg: ModelConfig, own: Mapping[str, Tensor]) -> StateDict:
    """Our weights in another library's key layout (the inverse of `to_project`)."""
    where = places(fmt, cfg, own)
    result: StateDict = {}
    for key, value in own.items():
        module, param = key.rsplit(".", 1)
        names = [f"{m}.{param}" for m in where[module]]
        for name, part in zip(names, value.chunk(len(names)) if len(names) > 1 else (value,)):
            result[name] = part.detach().clone().contiguous()
    return result


def _describe(cfg: ModelConfig) -> str:
    if cfg.name == "mobilevit":
        removed = removed_layers(cfg.mobilevit)
        return f"MobileViT {cfg.mobilevit.mode}" + (f" without layers {removed}" if removed else "")
    return f"ResNet-{cfg.resnet.depth} ({cfg.resnet.stem} stem)"


def _shape_hint(cfg: ModelConfig) -> str:
    if cfg.name == "mobilevit":
        return "is --model.mobilevit.mode the file's size (xx_small, x_small, small), with no layers removed?"
    return "is --model.resnet.depth the file's depth (18, 34, 50)?"


def flip_stem_channels(state: StateDict, cfg: ModelConfig) -> None:
    """Reverse the input channels of the first convolution in place: a network trained on BGR
    images then reads RGB ones and gives the same logits (ml-cvnets' and HF's MobileViTs were
    trained on BGR)."""
    key = "stages.stem.conv.weight" if cfg.name == "mobilevit" else "stages.stem.0.conv.weight"
    state[key] = state[key].flip(1).contiguous()


def write_state_dict(state: Mapping[str, Tensor], path: str) -> None:
    """Save a foreign-layout state dict: safetensors for *.safetensors, else torch.save (atomic)."""
    if path.endswith(".safetensors"):
        atomic_write_bytes(path, _safetensors("writing", path).save(dict(state)))
        return
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write_bytes(path, buffer.getbuffer().tobytes())


def hf_config(cfg: ModelConfig, num_classes: int, labels: Sequence[str] = ()) -> Dict[str, object]:
    """The config.json of transformers' MobileViTForImageClassification for this MobileViT (plain data)."""
    if cfg.name != "mobilevit":
        raise WeightMappingError("the hf layout is written for MobileViT only; export ResNets with --to timm")
    _check_mobilevit("hf", cfg)
    variant, knobs = VARIANTS[cfg.mobilevit.mode], cfg.mobilevit
    outs = [spec.out for spec in variant.layers]
    vit = [spec for spec in variant.layers if isinstance(spec, ViTLayer)]
    names = list(labels) if len(labels) == num_classes else [f"LABEL_{i}" for i in range(num_classes)]
    return {
        "model_type": "mobilevit", "architectures": ["MobileViTForImageClassification"],
        "num_channels": 3, "image_size": 256, "patch_size": 2,
        "hidden_sizes": [spec.d for spec in vit],
        "neck_hidden_sizes": [16, *outs, min(HEAD_EXPANSION * outs[-1], HEAD_MAX_CHANNELS)],
        "num_attention_heads": knobs.num_heads, "mlp_ratio": vit[0].ffn / vit[0].d,
        "expand_ratio": float(variant.expand), "hidden_act": "silu", "conv_kernel_size": 3, "output_stride": 32,
        "hidden_dropout_prob": knobs.dropout, "attention_probs_dropout_prob": knobs.attn_dropout,
        "classifier_dropout_prob": cfg.classifier_dropout, "layer_norm_eps": 1e-5, "qkv_bias": True,
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }
