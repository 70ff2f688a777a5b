"""Weights of timm, torchvision, ml-cvnets and transformers: imported models give the source's logits,
export gives the source's tensors back, bad files are refused in one line, fine-tuning starts from them.

The oracles are the libraries themselves (timm, torchvision, transformers, randomly initialised,
BatchNorm statistics included); ml-cvnets is not installable here, so its key layout is written
below from its module names and checked against timm's MobileViT and a torchvision ResNet given
ml-cvnets' stem.
"""
import logging
import os
import re
import subprocess
import sys
from typing import Tuple

import pytest
import torch
from torch import nn

import cvnets
from cvnets import pretrained
from engine import checkpoint as ckpt
from engine.commands import train
from helpers import REPO, CodePayload, assert_same_weights, child_env
from options.config import load_config
from options.schema import ModelConfig
from tools import import_weights

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

XXS_CONFIG = os.path.join(REPO, "config", "mobilevit_xx_small.yaml")
CONFIGS = {"xx_small": "mobilevit_xx_small.yaml", "x_small": "mobilevit_x_small.yaml", "small": "mobilevit_small.yaml"}
TIMM_MOBILEVIT = {"xx_small": "mobilevit_xxs", "x_small": "mobilevit_xs", "small": "mobilevit_s"}
# transformers' MobileViTConfig of each size (the values of apple/mobilevit-* on the Hub)
HF_SIZES = {
    "xx_small": dict(hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0),
    "x_small": dict(hidden_sizes=[96, 120, 144], neck_hidden_sizes=[16, 32, 48, 64, 80, 96, 384]),
    "small": dict(hidden_sizes=[144, 192, 240], neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640]),
}


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight, bias and BatchNorm statistic drawn at random, scaled so the logits depend on the input."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda t, scale, shift=0.0: t.copy_(torch.randn(t.shape, generator=g) * scale + shift)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                rand(m.weight, (2.0 / m.weight[0].numel()) ** 0.5)  # He: SiLU/ReLU keep the signal alive
                if m.bias is not None:
                    rand(m.bias, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                rand(m.weight, 0.2, 1.0)
                rand(m.bias, 0.1)
                if isinstance(m, nn.BatchNorm2d):
                    rand(m.running_mean, 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                    m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model.eval()


def ours(config: str, *flags: str) -> Tuple[nn.Module, ModelConfig]:
    cfg = load_config(["--common.config-file", os.path.join(REPO, "config", config), "--model.num-classes", "1000",
                       *flags])
    return cvnets.build_model(cfg.model, 1000).eval(), cfg.model


def assert_same_logits(reference, model, size, forward=lambda m, x: m(x)):
    g = torch.Generator().manual_seed(size)
    x = torch.stack([torch.randn(3, size, size, generator=g), 2 * torch.rand(3, size, size, generator=g)])
    with torch.no_grad():
        want, got = forward(reference, x), model(x)
    scale = max(1.0, want.abs().max().item())
    assert (want[0] - want[1]).abs().max() > 1e-2 * scale  # the logits depend on the input: a real comparison
    assert (want - got).abs().max() <= 1e-4 * scale


def imported(source: nn.Module, config: str, *flags: str, fmt: str = None, state=None):
    """Our model loaded from the source's state dict (format recognised by its keys unless given)."""
    state = source.state_dict() if state is None else state
    detected, _ = pretrained.detect_format(state)
    model, model_cfg = ours(config, *flags)
    weights, kept = pretrained.to_project(fmt or detected, model_cfg, model.state_dict(), state)
    assert not kept and len(weights) == len(model.state_dict())
    model.load_state_dict(weights)
    return model, model_cfg, detected


# ----------------------------------------------------------------------------- timm, torchvision, HF
@pytest.mark.parametrize("size", ["xx_small", "x_small", "small"])
def test_timm_mobilevit_gives_the_same_logits_and_exports_back_exactly(size):
    source = randomise(timm.create_model(TIMM_MOBILEVIT[size], pretrained=False), seed=1)
    model, model_cfg, fmt = imported(source, CONFIGS[size])
    assert fmt == "timm"
    for px in (64, 256) if size == "xx_small" else (64,):
        assert_same_logits(source, model, px)
    assert_same_weights(pretrained.from_project("timm", model_cfg, model.state_dict()), source.state_dict())


@pytest.mark.parametrize("name,depth,sizes", [("resnet18", "18", (64, 256)), ("resnet50", "50", (64,))])
def test_timm_resnet_gives_the_same_logits_and_exports_back_exactly(name, depth, sizes):
    source = randomise(timm.create_model(name, pretrained=False), seed=2)
    model, model_cfg, _ = imported(source, f"resnet{depth}.yaml", "--model.resnet.stem", "imagenet")
    for px in sizes:
        assert_same_logits(source, model, px)
    assert_same_weights(pretrained.from_project("timm", model_cfg, model.state_dict()), source.state_dict())


def test_torchvision_resnet18_gives_the_same_logits():
    source = randomise(torchvision.models.resnet18(weights=None), seed=3)
    model, _, fmt = imported(source, "resnet18.yaml", "--model.resnet.stem", "imagenet")
    assert fmt == "torchvision"
    for px in (64, 256):
        assert_same_logits(source, model, px)


def hf_model(size):
    config = transformers.MobileViTConfig(num_labels=1000, **HF_SIZES[size])
    return randomise(transformers.MobileViTForImageClassification(config), seed=4)


def hf_logits(model, x):
    return model(pixel_values=x).logits


@pytest.mark.parametrize("size", ["xx_small", "x_small", "small"])
def test_hf_mobilevit_separate_qkv_gives_the_same_logits_and_exports_back_exactly(size):
    source = hf_model(size)
    model, model_cfg, fmt = imported(source, CONFIGS[size])
    assert fmt == "hf"
    for px in (64, 256) if size == "x_small" else (64,):
        assert_same_logits(source, model, px, hf_logits)
    assert_same_weights(pretrained.from_project("hf", model_cfg, model.state_dict()), source.state_dict())


# ----------------------------------------------------------------------------- ml-cvnets
# ml-cvnets' module names (cvnets/models/classification/mobilevit.py, resnet.py, cvnets/modules/
# mobilenetv2.py, mobilevit_block.py, transformer.py, layers/conv_layer.py) from timm's/torchvision's.
CVNETS_FROM_TIMM_MOBILEVIT = [
    (r"\.conv\.(?=[a-z_]+$)", ".block.conv."), (r"\.bn\.(?=[a-z_]+$)", ".block.norm."),  # conv-norm units
    (r"^stem\.", "conv_1."), (r"^final_conv\.", "conv_1x1_exp."), (r"^head\.fc\.", "classifier.fc."),
    (r"^stages\.(\d)\.(\d+)\.conv1_1x1\.", r"L\1.\2.block.exp_1x1."),
    (r"^stages\.(\d)\.(\d+)\.conv2_kxk\.", r"L\1.\2.block.conv_3x3."),
    (r"^stages\.(\d)\.(\d+)\.conv3_1x1\.", r"L\1.\2.block.red_1x1."),
    (r"^stages\.(\d)\.1\.conv_kxk\.", r"L\1.1.local_rep.conv_3x3."),
    (r"^stages\.(\d)\.1\.conv_1x1\.weight", r"L\1.1.local_rep.conv_1x1.block.conv.weight"),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.norm1\.", r"L\1.1.global_rep.\2.pre_norm_mha.0."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.attn\.qkv\.", r"L\1.1.global_rep.\2.pre_norm_mha.1.qkv_proj."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.attn\.proj\.", r"L\1.1.global_rep.\2.pre_norm_mha.1.out_proj."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.norm2\.", r"L\1.1.global_rep.\2.pre_norm_ffn.0."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.mlp\.fc1\.", r"L\1.1.global_rep.\2.pre_norm_ffn.1."),
    (r"^stages\.(\d)\.1\.transformer\.(\d)\.mlp\.fc2\.", r"L\1.1.global_rep.\2.pre_norm_ffn.4."),
    (r"^stages\.(\d)\.1\.norm\.", r"L\1.1.global_rep.LAST."),
    (r"^stages\.(\d)\.1\.conv_proj\.", r"L\1.1.conv_proj."), (r"^stages\.(\d)\.1\.conv_fusion\.", r"L\1.1.fusion."),
]


def cvnets_mobilevit_state(timm_state, blocks_per_layer):
    state = {}
    for key, value in timm_state.items():
        for pattern, repl in CVNETS_FROM_TIMM_MOBILEVIT:
            key = re.sub(pattern, repl, key)
        key = re.sub(r"^L(\d)", lambda m: f"layer_{int(m[1]) + 1}", key)  # ml-cvnets counts layers from 1
        # the LayerNorm closing global_rep comes after the layer's transformer blocks
        if "LAST" in key:
            key = key.replace("LAST", str(blocks_per_layer[int(key[len("layer_")])]))
        state[key] = value
    assert len(state) == len(timm_state)
    return state


def test_cvnets_mobilevit_layout_gives_the_same_logits():
    source = randomise(timm.create_model("mobilevit_xxs", pretrained=False), seed=5)
    state = cvnets_mobilevit_state(source.state_dict(), {3: 2, 4: 4, 5: 3})
    assert "layer_3.1.global_rep.0.pre_norm_mha.1.qkv_proj.weight" in state and "layer_4.1.global_rep.4.weight" in state
    model, model_cfg, fmt = imported(source, "mobilevit_xx_small.yaml", state=state)
    assert fmt == "cvnets"
    assert_same_logits(source, model, 64)
    assert_same_weights(pretrained.from_project("cvnets", model_cfg, model.state_dict()), state)


# ml-cvnets' units of a residual branch: BasicResNetBlock and BottleneckResNetBlock (cvnets/modules/resnet*.py)
CVNETS_BRANCH = {18: ("conv_batch_act_1", "conv_batch_2"), 50: ("conv_batch_act_1", "conv_batch_act_2", "conv_batch_3")}


@pytest.mark.parametrize("depth", [18, 50])
def test_cvnets_resnet_layout_gives_the_same_logits(depth):
    # ml-cvnets' ResNet is torchvision's with a 3x3 stride-2 conv and a stride-2 depthwise conv as its stem.
    source = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    source.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
    source.maxpool = nn.Sequential(nn.Conv2d(64, 64, 3, 2, 1, groups=64, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    randomise(source, seed=6)
    renames = [(r"^conv1\.", "conv_1.block.conv."), (r"^bn1\.", "conv_1.block.norm."),
               (r"^maxpool\.0\.", "layer_1.block.conv."), (r"^maxpool\.1\.", "layer_1.block.norm."),
               (r"^fc\.", "classifier.classifier_fc."),
               (r"^layer(\d)\.(\d)\.downsample\.0\.", r"L\1.block_\2.down_sample.block.conv."),
               (r"^layer(\d)\.(\d)\.downsample\.1\.", r"L\1.block_\2.down_sample.block.norm.")]
    for i, unit in enumerate(CVNETS_BRANCH[depth], start=1):
        renames += [(rf"^layer(\d)\.(\d)\.conv{i}\.", rf"L\1.block_\2.block.{unit}.block.conv."),
                    (rf"^layer(\d)\.(\d)\.bn{i}\.", rf"L\1.block_\2.block.{unit}.block.norm.")]
    state = {}
    for key, value in source.state_dict().items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        state[re.sub(r"^L(\d)", lambda m: f"layer_{int(m[1]) + 1}", key)] = value
    model, _, fmt = imported(source, f"resnet{depth}.yaml", state=state)  # the paper's cvnets stem
    assert fmt == "cvnets" and "layer_2.block_0.block.conv_batch_act_1.block.conv.weight" in state
    assert_same_logits(source, model, 64)


# ----------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def xxs_state():
    return randomise(timm.create_model("mobilevit_xxs", pretrained=False), seed=7).state_dict()


def test_unmatched_keys_are_named_on_both_sides(xxs_state):
    model, model_cfg = ours("mobilevit_xx_small.yaml")
    missing = {k: v for k, v in xxs_state.items() if k != "stages.2.1.conv_1x1.weight"}
    with pytest.raises(pretrained.WeightMappingError, match=r"model key stages\.layer3\.1\.local\.1\.conv\.weight "
                       r"\(looked for stages\.2\.1\.conv_1x1\.weight\) is not in the file; every file key is used"):
        pretrained.to_project("timm", model_cfg, model.state_dict(), missing)
    extra = {**xxs_state, "stages.2.1.extra.weight": torch.zeros(1)}
    with pytest.raises(pretrained.WeightMappingError, match=r"every model key is filled; file key stages\.2\.1\.extra"):
        pretrained.to_project("timm", model_cfg, model.state_dict(), extra)
    small, small_cfg = ours("mobilevit_small.yaml")
    with pytest.raises(pretrained.WeightMappingError, match=r"shape mismatch: the file's stages\.0\.0\.conv1_1x1"):
        pretrained.to_project("timm", small_cfg, small.state_dict(), xxs_state)


def test_settings_the_other_libraries_lack_are_refused_with_the_fix(xxs_state):
    tiny, tiny_cfg = ours("mobilevit_tiny.yaml")
    with pytest.raises(pretrained.WeightMappingError, match="without layers or fusion"):
        pretrained.to_project("timm", tiny_cfg, tiny.state_dict(), xxs_state)
    heads, heads_cfg = ours("mobilevit_xx_small.yaml", "--model.mobilevit.num-heads", "2")
    with pytest.raises(pretrained.WeightMappingError, match="--model.mobilevit.num-heads 4"):
        pretrained.to_project("timm", heads_cfg, heads.state_dict(), xxs_state)
    resnet, resnet_cfg = ours("resnet18.yaml")
    with pytest.raises(pretrained.WeightMappingError, match="--model.resnet.stem imagenet"):
        pretrained.to_project("torchvision", resnet_cfg, resnet.state_dict(), {})


def bad_files(folder, state):
    torch.save({k: v for k, v in state.items() if not k.startswith("final_conv.bn.")}, folder / "missing.pth")
    torch.save({**state, "extra.weight": torch.zeros(3)}, folder / "extra.pth")
    torch.save({**state, "head.fc.weight": torch.zeros(1000, 321)}, folder / "shape.pth")
    torch.save({**state, "payload": CodePayload(folder / "ran")}, folder / "payload.pth", pickle_protocol=2)
    return {"missing": "final_conv.bn.", "extra": "extra.weight", "shape": "head.fc.weight",
            "payload": "Python objects"}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "extra", "shape", "payload"])
def test_a_bad_file_is_one_line_exit_2_and_nothing_written(case, xxs_state, tmp_path):
    named = bad_files(tmp_path, xxs_state)[case]
    out = tmp_path / "out.pt"
    done = subprocess.run([sys.executable, "-m", "tools.import_weights", str(tmp_path / f"{case}.pth"),
                           "--common.config-file", "config/mobilevit_xx_small.yaml", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
    assert not out.exists() and not (tmp_path / "ran").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".") or p.endswith(".tmp")]


def test_the_tool_imports_and_exports_back_to_timm_and_hf(xxs_state, tmp_path, capsys):
    source = tmp_path / "xxs.pth"
    torch.save(xxs_state, source)
    out = tmp_path / "xxs.pt"
    assert import_weights.main([str(source), "--common.config-file", XXS_CONFIG,
                                "--output", str(out)]) == 0
    assert "timm layout: 311 tensors mapped onto 311 of the model's 311" in capsys.readouterr().out
    state = ckpt.load(str(out))
    assert state["num_classes"] == 1000 and state["config"]["model"]["num_classes"] == 1000
    assert state["source"]["format"] == "timm" and state["source"]["path"] == str(source)

    back = tmp_path / "back.safetensors"
    assert import_weights.main([str(out), "--to", "timm", "--output", str(back)]) == 0
    reloaded = timm.create_model("mobilevit_xxs", pretrained=True, pretrained_cfg_overlay=dict(file=str(back))).eval()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in xxs_state.items())

    folder = tmp_path / "hf"
    assert import_weights.main([str(out), "--to", "hf", "--output", str(folder)]) == 0
    hf = transformers.MobileViTForImageClassification.from_pretrained(str(folder)).eval()
    assert_same_logits(hf, reloaded, 64, hf_logits)


def test_input_order_bgr_makes_a_bgr_network_read_rgb(xxs_state, tmp_path, capsys):
    source = tmp_path / "xxs.pth"
    torch.save(xxs_state, source)
    out = tmp_path / "rgb.pt"
    assert import_weights.main([str(source), "--common.config-file", XXS_CONFIG,
                                "--input-order", "bgr", "--output", str(out)]) == 0
    model, _ = ours("mobilevit_xx_small.yaml")
    model.load_state_dict(ckpt.load(str(out))["model"])
    bgr_network = randomise(timm.create_model("mobilevit_xxs", pretrained=False), seed=7)
    rgb = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(rgb), bgr_network(rgb.flip(1)), atol=1e-4)


# ----------------------------------------------------------------------------- fine-tuning
def finetune_args(root, results, label, checkpoint, *extra):
    return ["--common.config-file", os.path.join(REPO, "config", "finetune", "mobilevit_xx_small.yaml"),
            "--model.checkpoint", str(checkpoint), "--model.num-classes", "200",
            "--dataset.root", str(root), "--dataset.workers", "0", "--dataset.train-batch-size", "8",
            "--dataset.val-batch-size", "8", "--sampler.crop-size", "32",
            "--image-augmentation.val", "[{name: resize, size: 36}, {name: center_crop, size: 32}]",
            "--scheduler.max-epochs", "1", "--scheduler.warmup-iterations", "2", "--common.max-batches-per-epoch", "3",
            "--common.results-loc", str(results), "--common.run-label", label, *extra]


@pytest.mark.parametrize("direct", [False, True], ids=["imported", "foreign_file"])
def test_fine_tuning_with_200_classes_reinitialises_the_classifier_only(direct, xxs_state, fake_root, tmp_path, caplog):
    source = tmp_path / "xxs.pth"
    torch.save(xxs_state, source)
    start = source
    if not direct:
        start = tmp_path / "xxs.pt"
        assert import_weights.main([str(source), "--common.config-file",
                                    XXS_CONFIG, "--output", str(start)]) == 0
    with caplog.at_level(logging.INFO, logger="cvnets"):
        assert train(finetune_args(fake_root, tmp_path, "ft", start)) == 0
    layout = "timm layout" if direct else "a checkpoint of this tool"
    assert (f"initialised from {start} ({layout}): 309 of 311 tensors loaded; classifier re-initialised for "
            "200 classes (the file has 1000)") in caplog.text
    assert len(xxs_state) == 311  # 309 = all but the classifier's weight and bias


def test_a_frozen_backbone_keeps_its_weights_and_statistics(xxs_state, fake_root, tmp_path):
    source = tmp_path / "xxs.pth"
    torch.save(xxs_state, source)
    assert train(finetune_args(fake_root, tmp_path, "probe", source, "--model.freeze", "backbone",
                               "--ema.enable", "false")) == 0
    trained = ckpt.load(str(tmp_path / "probe" / "checkpoint_last.pt"))["model"]
    model, model_cfg = ours("mobilevit_xx_small.yaml")
    start, _ = pretrained.to_project("timm", model_cfg, model.state_dict(), xxs_state)
    backbone = [k for k in trained if k.startswith("stages.")]
    changed = [k for k in backbone if not torch.equal(trained[k], start[k])]
    assert backbone and not changed  # running statistics too
    assert trained["classifier.1.weight"].shape == (200, 320)


def test_load_pretrained_fills_everything_but_a_classifier_of_another_size(xxs_state, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(xxs_state, str(path))
    cfg = load_config(["--common.config-file", os.path.join(REPO, "config", "finetune", "mobilevit_xx_small.yaml"),
                       "--model.num-classes", "200"])
    torch.manual_seed(0)
    model = cvnets.build_model(cfg.model, 200)
    fresh_head = model.classifier[1].weight.detach().clone()
    report = ckpt.load_pretrained(model, str(path), cfg.model)
    assert (report.layout, report.loaded, report.total, report.file_classes) == ("timm layout", 309, 311, 1000)
    assert report.fresh == ("classifier.1.weight", "classifier.1.bias")
    own = model.state_dict()
    assert torch.equal(own["stages.layer3.1.transformer.0.attn.qkv.weight"],
                       xxs_state["stages.2.1.transformer.0.attn.qkv.weight"])
    assert torch.equal(own["stages.head.norm.running_var"], xxs_state["final_conv.bn.running_var"])
    assert torch.equal(own["classifier.1.weight"], fresh_head)

    resnet_cfg = load_config(["--common.config-file", os.path.join(REPO, "config", "finetune", "resnet18.yaml")]).model
    with pytest.raises(ckpt.CheckpointError, match=r"holds mobilevit weights \(timm layout\) but model.name is resnet"):
        ckpt.load_pretrained(cvnets.build_model(resnet_cfg, 200), str(path), resnet_cfg)


def test_freeze_backbone_leaves_only_the_classifier_trainable_and_the_stages_in_eval_mode():
    model, _ = ours("resnet18.yaml")
    model.freeze_backbone()
    model.train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.1.weight", "classifier.1.bias"]
    assert not any(m.training for m in model.stages.modules()) and model.classifier.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no running statistics moved
