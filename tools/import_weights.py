"""Bring weights of timm, torchvision, ml-cvnets or Hugging Face into this project, or take them back out.

    python -m tools.import_weights SRC --common.config-file CONFIG --output OUT.pt
        [--format auto|timm|torchvision|cvnets|hf] [--num-classes N] [--input-order rgb|bgr] [--key value ...]
    python -m tools.import_weights CHECKPOINT.pt --to timm|hf --output OUT

SRC: a .pth/.pt/.bin state dict, a trainer's checkpoint holding one, or a .safetensors file; it is
read without running code. Every tensor must map onto the model CONFIG builds (MobileViT xx_small,
x_small, small; ResNet-18/34/50 with --model.resnet.stem imagenet for timm/torchvision, cvnets for
ml-cvnets) exactly once, with the same shape. OUT is a weights checkpoint of this project (config
and source inside) for --model.checkpoint, main_eval.py and main_export.py. --num-classes N other
than the file's leaves the classifier freshly initialised. --input-order bgr: the file's network was
trained on BGR images (ml-cvnets and Hugging Face MobileViTs); its stem is flipped to read RGB.
--to timm writes a timm state dict (.safetensors or .pth) for
timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT)); --to hf writes a
folder (config.json + model.safetensors) for MobileViTForImageClassification.from_pretrained(OUT).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import List, Optional, Sequence

from cvnets import check_config, pretrained
from cvnets.export import MissingExtraError
from engine import checkpoint as ckpt
from options.cli import fail, parse_config
from options.config import override, to_dict
from utils.files import atomic_write_text

PROG = "python -m tools.import_weights"


def _options(argv: List[str]) -> "tuple[argparse.Namespace, List[str]]":
    parser = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    parser.add_argument("--format", default="auto", choices=("auto", *pretrained.FORMATS))
    parser.add_argument("--to", choices=("timm", "hf"))
    parser.add_argument("--output")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--input-order", default="rgb", choices=("rgb", "bgr"))
    parser.error = lambda message: fail(message)  # one line, exit 2
    return parser.parse_known_args(argv)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_file(src: str, args: argparse.Namespace, rest: List[str]) -> List[str]:
    state = pretrained.read_state_dict(src)
    fmt, family = pretrained.detect_format(state) if args.format == "auto" else (args.format, None)
    cfg = parse_config(rest, PROG, __doc__, check=lambda cfg: check_config(cfg.model))
    if family is not None and family != cfg.model.name:
        raise pretrained.WeightMappingError(f"{src} holds {family} weights ({fmt} layout) but the config builds "
                                            f"model.name {cfg.model.name}; use a {family} config")
    model, lines = pretrained.import_model(fmt, cfg.model, state, args.num_classes, args.input_order)
    classes = int(model.state_dict()[ckpt.CLASSIFIER_WEIGHT].shape[0])
    cfg = override(cfg, {"model.num_classes": classes})
    source = {"path": os.path.abspath(src), "format": fmt, "sha256": _sha256(src), "input_order": args.input_order}
    params = sum(p.numel() for p in model.parameters())
    ckpt.save(ckpt.imported_state(to_dict(cfg), model.state_dict(), params, source), args.output)
    done = f"wrote {args.output}: {cfg.model.name}, {classes} classes, {params:,} parameters"
    return [f"{src}: {lines[0]}", *lines[1:], done]


def export_file(src: str, args: argparse.Namespace, rest: List[str]) -> List[str]:
    if rest:
        fail(f"--to {args.to} takes no config flags ({rest[0]}): the checkpoint's own config describes its weights")
    state = ckpt.load(src)
    cfg = parse_config([], PROG, __doc__, base=lambda flags: state["config"])
    weights = pretrained.from_project(args.to, cfg.model, state["model"])
    if args.to == "timm":
        pretrained.write_state_dict(weights, args.output)
        return [f"wrote {args.output}: {len(weights)} tensors in timm's layout"]
    config = pretrained.hf_config(cfg.model, state["num_classes"], state.get("wnids") or ())
    os.makedirs(args.output, exist_ok=True)
    pretrained.write_state_dict(weights, os.path.join(args.output, "model.safetensors"))
    atomic_write_text(os.path.join(args.output, "config.json"), json.dumps(config, indent=2))
    return [f"wrote {args.output}/config.json and model.safetensors: {len(weights)} tensors in transformers' layout"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        if any(a in ("--help", "-h") for a in argv):
            parse_config(["--help"], PROG, __doc__)
        fail(f"usage: {PROG} SRC --common.config-file CONFIG --output OUT.pt (or SRC --to timm|hf --output OUT)")
    src, (args, rest) = argv[0], _options(argv[1:])
    if not args.output:
        fail("--output: give the file to write (nothing was written)")
    if args.to != "hf" and os.path.isdir(args.output):
        fail(f"--output: {args.output} is a folder; give a file path inside it")
    try:
        lines = (export_file if args.to else import_file)(src, args, rest)
    except (pretrained.WeightMappingError, ckpt.CheckpointError, MissingExtraError) as e:
        fail(str(e))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
