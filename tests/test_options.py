"""The config system: precedence, base inheritance, validation errors, safe YAML, the command
line front door, round trip, registries."""
import dataclasses
import importlib
import os
import subprocess
import sys
import textwrap
import typing

import pytest
import yaml

from helpers import REPO
from options import Registry, RegistryError
from options.cli import parse_config
from options.config import ConfigError, from_dict, iter_keys, load_config, override, save_config, to_yaml
from options.schema import Config, CosineConfig, literal_choices


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(argv, base=None) -> str:
    """The one-line ConfigError message that resolving argv raises."""
    with pytest.raises(ConfigError) as e:
        load_config(argv, base=base)
    message = str(e.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- precedence
def test_defaults_come_from_the_schema():
    cfg = load_config([])
    assert cfg == Config()
    assert cfg.optim.name == "adamw" and cfg.sampler.crop_size == 64


def test_precedence_defaults_base_file_cli(tmp_path):
    write(tmp_path / "base.yaml", """
        optim: {weight_decay: 0.5, name: sgd}
        scheduler: {max_epochs: 7}
        common: {seed: 3}
    """)
    cfg_file = write(tmp_path / "exp.yaml", """
        base: [base.yaml]
        optim: {weight_decay: 0.25}
        common: {seed: 4}
    """)
    cfg = load_config(["--common.config-file", cfg_file, "--common.seed", "9"])
    assert cfg.optim.name == "sgd"  # base over default
    assert cfg.scheduler.max_epochs == 7  # base
    assert cfg.optim.weight_decay == 0.25  # file over base
    assert cfg.common.seed == 9  # flag over file
    assert cfg.optim.sgd.momentum == 0.9  # untouched default
    assert cfg.common.config_file == cfg_file


def test_base_mapping_sits_beneath_the_file(tmp_path):
    stored = {"model": {"name": "resnet", "classifier_dropout": 0.3}, "common": {"seed": 5, "log_freq": 7}}
    cfg_file = write(tmp_path / "exp.yaml", "model: {classifier_dropout: 0.2}\n")
    cfg = load_config(["--common.config-file", cfg_file, "--common.seed", "6"], base=stored)
    assert cfg.model.name == "resnet"  # base over default
    assert cfg.model.classifier_dropout == 0.2  # file over base
    assert cfg.common.seed == 6  # flag over base
    # A stored config cannot be edited: its old keys are renamed, not refused.
    assert cfg.common.log_every_batches == 7


def test_bases_merge_in_order_and_nest(tmp_path):
    os.makedirs(tmp_path / "sub")
    write(tmp_path / "sub" / "a.yaml", "scheduler: {max_epochs: 1, warmup_iterations: 5}\n")
    write(tmp_path / "sub" / "b.yaml", "base: a.yaml\nscheduler: {max_epochs: 2}\n")
    write(tmp_path / "c.yaml", "scheduler: {max_epochs: 3}\n")
    top = write(tmp_path / "top.yaml", "base: [sub/b.yaml, c.yaml]\n")
    cfg = load_config(["--common.config-file", top])
    assert cfg.scheduler.max_epochs == 3
    assert cfg.scheduler.warmup_iterations == 5


def test_a_key_spelled_with_dashes_is_overridden_like_any_other(tmp_path):
    # Dashes and underscores are one key in files and flags alike, so the later layer wins
    # whichever spelling each layer used.
    write(tmp_path / "base.yaml", "optim: {weight-decay: 0.1}\n")
    top = write(tmp_path / "top.yaml", "base: [base.yaml]\noptim: {weight_decay: 0.2}\n")
    assert load_config(["--common.config-file", top]).optim.weight_decay == 0.2
    argv = ["--common.config-file", str(tmp_path / "base.yaml"), "--optim.weight-decay", "0.3"]
    assert load_config(argv).optim.weight_decay == 0.3
    assert load_config([], base={"optim": {"weight-decay": 0.1}, "common": {"seed": 2}}).optim.weight_decay == 0.1
    assert load_config(["--optim.weight_decay", "0.4"], base={"optim": {"weight-decay": 0.1}}).optim.weight_decay == 0.4


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: [b.yaml]\n")
    write(tmp_path / "b.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(["--common.config-file", str(tmp_path / "a.yaml")])


def test_values_are_checked_once_after_merging(tmp_path):
    # min_lr above the default max_lr is fine once the flag raises max_lr: the layers are merged
    # first, then checked, so a flag can repair a file.
    path = write(tmp_path / "exp.yaml", "scheduler: {cosine: {min_lr: 0.01}}\n")
    assert "scheduler.cosine.min_lr: 0.01 must be <= max_lr (0.002)" in error_of(["--common.config-file", path])
    cfg = load_config(["--common.config-file", path, "--scheduler.cosine.max-lr", "0.1"])
    assert (cfg.scheduler.cosine.min_lr, cfg.scheduler.cosine.max_lr) == (0.01, 0.1)


def test_messages_name_the_file_a_bad_value_came_from(tmp_path):
    write(tmp_path / "parent.yaml", "common: {accum_freq: 0}\nloss: {label_smoothing: 0.1}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\noptim: {weight_decay: 0.1}\n")
    message = error_of(["--common.config-file", child])
    assert "common.accum_freq: 0 must be >= 1" in message and "parent.yaml" in message
    assert "child.yaml" not in message
    write(tmp_path / "parent.yaml", "optim: {wieght_decay: 0.1}\n")
    message = error_of(["--common.config-file", child])
    assert "unknown key 'optim.wieght_decay' in" in message and "parent.yaml" in message


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--optim.weight-decay", "1e-3", 1e-3),
        ("--optim.weight_decay", "0.5", 0.5),
        ("--model.mobilevit.remove-layers", "3,4", (3, 4)),
        ("--model.mobilevit.remove-layers", "[3, 4]", (3, 4)),
        ("--model.mobilevit.remove-layers", "[]", ()),
        ("--common.channels-last", "false", False),
        ("--common.compile", "True", True),
        ("--common.compile", "1", True),
        ("--common.channels-last", "0", False),
        ("--model.mobilevit.fusion", "none", "none"),
        ("--model.num-classes", "null", None),
        ("--common.run-label", "007", "007"),
        ("--model.resnet.depth", "50", 50),
        ("--optim.adamw.betas", "0.8,0.99", (0.8, 0.99)),
        ("--common.seed", "4294967295", 2**32 - 1),
        ("--common.resume-allow-changes", "optim.weight_decay,scheduler", ("optim.weight_decay", "scheduler")),
    ],
)
def test_flag_values_are_typed(flag, value, expected):
    cfg = load_config([flag, value])
    key = flag[2:].replace("-", "_")
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == expected


def test_flag_equals_form():
    assert load_config(["--scheduler.max-epochs=12"]).scheduler.max_epochs == 12
    # the = form is how a value that starts with -- is written
    assert load_config(["--common.run-label=--odd"]).common.run_label == "--odd"


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--optim.wieght-decay", "1"], ["optim.wieght-decay", "did you mean 'optim.weight_decay'"]),
        (["--optim.name", "adamx"], ["optim.name", "'adamx'", "sgd, adam, adamw", "did you mean"]),
        (["--optim.weight-decay", "abc"], ["optim.weight_decay", "'abc'", "not a number", ">= 0"]),
        (["--scheduler.max-epochs", "1.5"], ["scheduler.max_epochs", "not an integer"]),
        (["--common.compile", "maybe"], ["common.compile", "true or false"]),
        (["--common.compile", "2"], ["common.compile", "2 is not a boolean"]),
        (["--common.config-file", "does/not/exist.yaml"], ["not found", "does/not/exist.yaml"]),
        (["--scheduler.name", "cosin"], ["did you mean 'cosine'"]),
        (["--common.run-label", "--common.seed=3"], ["--common.run-label needs a value", "--common.seed=3"]),
        (["--common.seed", "3", "--common.run-label"], ["--common.run-label needs a value"]),
        (["seed", "3"], ["unexpected argument 'seed'"]),
    ],
)
def test_bad_flags_name_the_key_and_the_fix(argv, fragments):
    message = error_of(argv)
    for fragment in fragments:
        assert fragment in message


# ----------------------------------------------------------------------------- bad values
# One case per kind of bad value a user met and per range the schema declares: (flags or a YAML
# file's text, fragments the one-line message must hold: the key (or file) and the bad value).
BAD = {
    # bad values users met
    "log_freq renamed": (["--common.log-freq", "0"], ["--common.log-freq", "--common.log-every-batches"]),
    "log_every_batches 0": (["--common.log-every-batches", "0"], ["common.log_every_batches: 0", ">= 1"]),
    "accum_freq 0": (["--common.accum-freq", "0"], ["common.accum_freq: 0", ">= 1"]),
    "num_heads 0": (["--model.mobilevit.num-heads", "0"], ["model.mobilevit.num_heads: 0", ">= 1"]),
    "dropout 1.5": (["--model.mobilevit.dropout", "1.5"], ["model.mobilevit.dropout: 1.5", "in [0, 1)"]),
    "ema momentum -1": (["--ema.momentum", "-1"], ["ema.momentum: -1.0", "in (0, 1]"]),
    "crop_size 0": (["--sampler.crop-size", "0"], ["sampler.crop_size: 0", ">= 1"]),
    "max_iterations renamed": (["--common.max-iterations-per-epoch", "0"],
                               ["--common.max-iterations-per-epoch", "--common.max-batches-per-epoch"]),
    "max_batches_per_epoch 0": (["--common.max-batches-per-epoch", "0"],
                                ["common.max_batches_per_epoch: 0", ">= 1 or null"]),
    "weight_decay nan": (["--optim.weight-decay", "nan"], ["optim.weight_decay", "'nan'", "finite", ">= 0"]),
    "seed -5": (["--common.seed", "-5"], ["common.seed: -5", "in [0, 4294967295]"]),
    "max_lr 1e400": ("scheduler: {cosine: {max_lr: 1e400}}\n", ["scheduler.cosine.max_lr", "1e400", "finite"]),
    "grad_clip -1": (["--common.grad-clip", "-1"], ["common.grad_clip: -1.0", "> 0 or null"]),
    "max_epochs 0": (["--scheduler.max-epochs", "0"], ["scheduler.max_epochs: 0", "in [1, 10000]"]),
    "label_smoothing 1.5": (["--loss.label-smoothing", "1.5"], ["loss.label_smoothing: 1.5", "in [0, 1)"]),
    "workers -3": (["--dataset.workers", "-3"], ["dataset.workers: -3", ">= 0"]),
    "cache gpu": (["--dataset.cache", "gpu"], ["dataset.cache: 'gpu'", "dataset.cache: memory", "augment_on: device"]),
    "cache gpu in a file": ("dataset: {cache: gpu}\n", ["dataset.cache: 'gpu'", "augment_on: device", "exp.yaml"]),
    "old cyclic max_lr": ("scheduler: {cyclic: {max_lr: 0.1}}\n", ["scheduler.cyclic.max_lr", "epochs_per_cycle"]),
    "old cyclic cycles": ("scheduler: {cyclic: {cycles: 3}}\n", ["scheduler.cyclic.cycles", "total_cycles"]),
    "log_freq in a file": ("common: {log_freq: 10}\n", ["common.log_freq is now common.log_every_batches", "exp.yaml"]),
    # the rest of the schema's ranges
    "grad_clip 0": (["--common.grad-clip", "0"], ["common.grad_clip: 0.0", "> 0"]),
    "fp16 on the cpu": (["--common.device", "cpu", "--common.mixed-precision", "fp16"],
                        ["common.mixed_precision: fp16 needs CUDA", "--common.mixed-precision"]),
    "empty run_label": (["--common.run-label", " "], ["common.run_label: ' '", "empty"]),
    "resume_allow_changes typo": (["--common.resume-allow-changes", "optim.weight-decay"],
                                  ["common.resume_allow_changes[0]", "did you mean 'optim.weight_decay'"]),
    "attn_dropout 1": (["--model.mobilevit.attn-dropout", "1"], ["model.mobilevit.attn_dropout: 1.0", "[0, 1)"]),
    "ffn_dropout -0.1": (["--model.mobilevit.ffn-dropout", "-0.1"], ["model.mobilevit.ffn_dropout: -0.1"]),
    "classifier_dropout 1": (["--model.classifier-dropout", "1"], ["model.classifier_dropout: 1.0"]),
    "remove_layers 2": (["--model.mobilevit.remove-layers", "2,3"], ["model.mobilevit.remove_layers[0]: 2", "[3, 5]"]),
    "num_classes 0": (["--model.num-classes", "0"], ["model.num_classes: 0", ">= 1 or null"]),
    "linear_std 0": (["--model.init.linear-std", "0"], ["model.init.linear_std: 0.0", "> 0"]),
    "vbs min_crop_size 0": (["--sampler.vbs.min-crop-size", "0"], ["sampler.vbs.min_crop_size: 0"]),
    "vbs min above max": (["--sampler.vbs.min-crop-size", "90"],
                          ["sampler.vbs.min_crop_size: 90", "max_crop_size (82)"]),
    "vbs max_n_scales 0": (["--sampler.vbs.max-n-scales", "0"], ["sampler.vbs.max_n_scales: 0"]),
    "vbs check_scale 0": (["--sampler.vbs.check-scale", "0"], ["sampler.vbs.check_scale: 0"]),
    "train_batch_size 0": (["--dataset.train-batch-size", "0"], ["dataset.train_batch_size: 0", "in [1, 65536]"]),
    "val_batch_size 0": (["--dataset.val-batch-size", "0"], ["dataset.val_batch_size: 0", "in [1, 65536]"]),
    "prefetch_factor 0": (["--dataset.prefetch-factor", "0"], ["dataset.prefetch_factor: 0"]),
    "fake classes 0": (["--dataset.fake.classes", "0"], ["dataset.fake.classes: 0"]),
    "mixup prob 1.5": (["--image-augmentation.mixup.prob", "1.5"], ["image_augmentation.mixup.prob: 1.5", "[0, 1]"]),
    "mixup alpha -1": (["--image-augmentation.mixup.mixup-alpha", "-1"], ["image_augmentation.mixup.mixup_alpha"]),
    "mean without std": (["--image-augmentation.mean", "0.5,0.5,0.5"], ["image_augmentation.mean", "std is null"]),
    "mean of 2 values": (["--image-augmentation.mean", "0.5,0.5", "--image-augmentation.std", "0.2,0.2"],
                         ["image_augmentation.mean: [0.5, 0.5]", "3 values"]),
    "std 0": (["--image-augmentation.mean", "0.5,0.5,0.5", "--image-augmentation.std", "0.2,0,0.2"],
              ["image_augmentation.std[1]: 0.0", "(0, 1]"]),
    "sgd momentum 1": (["--optim.sgd.momentum", "1"], ["optim.sgd.momentum: 1.0", "[0, 1)"]),
    "nesterov without momentum": (["--optim.sgd.momentum", "0", "--optim.sgd.nesterov", "true"],
                                  ["optim.sgd.nesterov", "momentum > 0"]),
    "beta 1": (["--optim.adamw.betas", "0.9,1"], ["optim.adamw.betas[1]: 1.0", "[0, 1)"]),
    "three betas": (["--optim.adam.betas", "0.9,0.99,0.999"], ["optim.adam.betas", "two numbers"]),
    "eps 0": (["--optim.adamw.eps", "0"], ["optim.adamw.eps: 0.0", "> 0"]),
    "weight_decay -1": (["--optim.weight-decay", "-1"], ["optim.weight_decay: -1.0", ">= 0"]),
    "warmup -1": (["--scheduler.warmup-iterations", "-1"], ["scheduler.warmup_iterations: -1", ">= 0"]),
    "warmup_init_lr inf": (["--scheduler.warmup-init-lr", "inf"], ["scheduler.warmup_init_lr", "'inf'", "finite"]),
    "cosine min above max": (["--scheduler.cosine.min-lr", "0.5"], ["scheduler.cosine.min_lr: 0.5", "max_lr (0.002)"]),
    "cosine max_lr -1": (["--scheduler.cosine.max-lr", "-1"], ["scheduler.cosine.max_lr: -1.0", ">= 0"]),
    "div_by_ten min above max": (["--scheduler.div-by-ten.min-lr", "1"], ["scheduler.div_by_ten.min_lr: 1.0"]),
    "plateau min above max": (["--scheduler.plateau.min-lr", "1"], ["scheduler.plateau.min_lr: 1.0"]),
    "polynomial min above max": (["--scheduler.polynomial.min-lr", "1"], ["scheduler.polynomial.min_lr: 1.0"]),
    "div_by_ten factor 0": (["--scheduler.div-by-ten.factor", "0"], ["scheduler.div_by_ten.factor: 0.0", "(0, 1]"]),
    "plateau factor 1.5": (["--scheduler.plateau.factor", "1.5"], ["scheduler.plateau.factor: 1.5", "(0, 1]"]),
    "milestones not increasing": (["--scheduler.div-by-ten.milestones", "40,30"],
                                  ["scheduler.div_by_ten.milestones[1]: 30", "(40)"]),
    "milestone 0": (["--scheduler.div-by-ten.milestones", "0,30"], ["scheduler.div_by_ten.milestones[0]: 0"]),
    "patience 0": (["--scheduler.plateau.patience", "0"], ["scheduler.plateau.patience: 0", ">= 1"]),
    "threshold -1": (["--scheduler.plateau.threshold", "-1"], ["scheduler.plateau.threshold: -1.0"]),
    "power 0": (["--scheduler.polynomial.power", "0"], ["scheduler.polynomial.power: 0.0", "> 0"]),
    "fixed lr -1": (["--scheduler.fixed.lr", "-1"], ["scheduler.fixed.lr: -1.0", ">= 0"]),
    "cyclic min_lr 0": (["--scheduler.cyclic.min-lr", "0"], ["scheduler.cyclic.min_lr: 0.0", "> 0"]),
    "cyclic end above min": (["--scheduler.cyclic.last-cycle-end-lr", "0.5"],
                             ["scheduler.cyclic.last_cycle_end_lr: 0.5", "min_lr (0.1)"]),
    "cyclic epochs_per_cycle 0": (["--scheduler.cyclic.epochs-per-cycle", "0"], ["scheduler.cyclic.epochs_per_cycle"]),
    "cyclic total_cycles 0": (["--scheduler.cyclic.total-cycles", "0"], ["scheduler.cyclic.total_cycles: 0"]),
    "ema momentum 0": (["--ema.momentum", "0"], ["ema.momentum: 0.0", "(0, 1]"]),
    "export batch_size 0": (["--export.batch-size", "0"], ["export.batch_size: 0", ">= 1"]),
    "export tolerance -1": (["--export.tolerance", "-1"], ["export.tolerance: -1.0", ">= 0"]),
    "dynamic_shape torchscript": (["--export.dynamic-shape", "true"], ["export.dynamic_shape", "format: onnx"]),
    "empty output_json": (["--eval.output-json", ""], ["eval.output_json: ''", "empty"]),
}


def _argv(case, tmp_path):
    payload, _ = BAD[case]
    if isinstance(payload, str):
        return ["--common.config-file", write(tmp_path / "exp.yaml", payload)]
    return payload


@pytest.mark.parametrize("case", BAD)
def test_bad_values_are_one_line_naming_key_and_value(case, tmp_path):
    message = error_of(_argv(case, tmp_path))
    for fragment in BAD[case][1]:
        assert fragment in message


@pytest.mark.parametrize("case", BAD)
def test_print_config_refuses_the_same_values(case, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_argv(case, tmp_path) + ["--print-config"], "prog", "doc")
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    for fragment in BAD[case][1]:
        assert fragment in err


def test_every_number_has_a_declared_range():
    # A new numeric key must decide its valid values (numbers are checked up front).
    def numeric(tp):
        return any(a in (int, float) for a in [tp, *typing.get_args(tp)]) or any(
            numeric(a) for a in typing.get_args(tp) if typing.get_origin(a) is tuple)

    undecided = [key for key, tp, f in iter_keys() if numeric(tp) and f.metadata.get("valid") is None]
    assert undecided == []


def test_sections_check_themselves_when_built_directly():
    with pytest.raises(ConfigError, match=r"min_lr: 0.5 must be <= max_lr \(0.1\)"):
        CosineConfig(max_lr=0.1, min_lr=0.5)
    with pytest.raises(ConfigError, match="max_lr: inf must be a finite number"):
        CosineConfig(max_lr=float("inf"))


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim.weight_decy.*bad.yaml.*did you mean 'optim.weight_decay'"):
        load_config(["--common.config-file", path])


def test_bad_value_in_a_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "model: {resnet: {depth: 19}}\n")
    message = error_of(["--common.config-file", path])
    assert "model.resnet.depth: 19 is not one of 18, 34, 50" in message and "bad.yaml" in message


# ----------------------------------------------------------------------------- safe YAML
def yaml_error(tmp_path, content: bytes) -> str:
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    message = error_of(["--common.config-file", str(path)])
    assert str(path) in message
    return message


def test_yaml_syntax_error_is_one_line(tmp_path):
    assert "fix the YAML syntax" in yaml_error(tmp_path, b"optim: {name: sgd\n")


@pytest.mark.parametrize(
    "content,fragments",
    [
        (b"optim:\n  weight_decay: 0.1\n  weight_decay: 0.2\n", [":3:", "duplicate key 'weight_decay'", "line 2"]),
        (b"optim: {weight_decay: 0.1}\noptim: {name: sgd}\n", [":2:", "duplicate key 'optim'"]),
        (b"optim:\n  weight_decay: 0.1\n  weight-decay: 0.2\n", [":3:", "duplicate key 'weight-decay'"]),
        (b"image_augmentation:\n  train:\n    - {name: random_gamma, p: 0.5, p: 1.0}\n", [":3:", "duplicate key 'p'"]),
    ],
)
def test_duplicate_keys_are_refused(tmp_path, content, fragments):
    message = yaml_error(tmp_path, content)
    for fragment in fragments:
        assert fragment in message


def test_aliases_are_refused_before_anything_expands(tmp_path):
    # A 669-byte bomb: nine levels of nine aliases each under one transform.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    body = "\n".join("  " + line for line in lines)
    content = f"image_augmentation:\n  bomb:\n{body}\n  train: [{{name: random_gamma, s: *a8}}]\n"
    message = yaml_error(tmp_path, content.encode())
    assert ":3:" in message and "aliases" in message


def test_non_utf8_is_one_line_with_its_line(tmp_path):
    message = yaml_error(tmp_path, b"common:\n  run_label: caf\xe9\n")
    assert ":2:" in message and "0xe9" in message and "UTF-8" in message


def test_utf8_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes("\ufeffcommon: {run_label: café}\n".encode("utf-8"))
    assert load_config(["--common.config-file", str(path)]).common.run_label == "café"


@pytest.mark.parametrize("content", [b"", b"# only a comment\n", b"\n\n"])
def test_empty_file_is_refused(tmp_path, content):
    assert "is empty; write at least one section or remove the file" in yaml_error(tmp_path, content)


@pytest.mark.parametrize(
    "base,fragments",
    [
        ("5", ["base: 5 must be a file name or a list of file names"]),
        ("[5]", ["base[0]: 5 is not a file name"]),
        ("{a: 1}", ["base: {'a': 1} must be a file name or a list"]),
        ("[ok.yaml, null]", ["base[1]: None is not a file name"]),
    ],
)
def test_base_must_be_file_names(tmp_path, base, fragments):
    write(tmp_path / "ok.yaml", "common: {seed: 1}\n")
    message = yaml_error(tmp_path, f"base: {base}\ncommon: {{seed: 2}}\n".encode())
    for fragment in fragments:
        assert fragment in message
    assert "not found" not in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "top level must be a mapping" in yaml_error(tmp_path, b"- common\n- optim\n")


# ----------------------------------------------------------------------------- parse_config
def test_parse_config_help_lists_every_key_with_type_range_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--help"], "prog.py", "The doc line.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("The doc line.\n")
    for key, _, _ in iter_keys():
        assert f"--{key.replace('_', '-')}  (" in out
    assert "--common.log-every-batches  (int, >= 1, default 50)" in out
    assert "--optim.adamw.betas  (list of float, each in [0, 1), default [0.9, 0.999])" in out
    assert "--common.grad-clip  (float or null, > 0, default null)" in out


def test_parse_config_print_config_round_trips(capsys):
    argv = ["--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml"), "--optim.weight-decay", "0.5"]
    with pytest.raises(SystemExit) as e:
        parse_config(argv + ["--print-config"], "prog.py")
    assert e.value.code == 0
    assert from_dict(yaml.safe_load(capsys.readouterr().out)) == load_config(argv)


def test_parse_config_returns_the_config_and_runs_check_first(capsys):
    seen = []
    cfg = parse_config(["--common.seed", "4"], "prog.py", check=seen.append)
    assert cfg.common.seed == 4 and seen == [cfg]

    def check(cfg):
        raise ConfigError("model.mobilevit.num_heads: 7 does not divide the width 96")

    with pytest.raises(SystemExit) as e:
        parse_config(["--print-config"], "prog.py", check=check)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err == "error: model.mobilevit.num_heads: 7 does not divide the width 96\n"


def test_parse_config_base_gets_the_flags_and_sits_beneath_the_file(tmp_path, capsys):
    got = []

    def base(flags):
        got.append(dict(flags))
        return {"model": {"name": "resnet", "classifier_dropout": 0.3}}

    path = write(tmp_path / "exp.yaml", "model: {classifier_dropout: 0.2}\n")
    cfg = parse_config(["--common.config-file", path, "--model.checkpoint", "run/x.pt"], "prog.py", base=base)
    assert got == [{"common.config_file": path, "model.checkpoint": "run/x.pt"}]
    assert (cfg.model.name, cfg.model.classifier_dropout, cfg.model.checkpoint) == ("resnet", 0.2, "run/x.pt")

    def no_checkpoint(flags):
        raise ConfigError("prog needs --model.checkpoint PATH")

    with pytest.raises(SystemExit) as e:
        parse_config([], "prog.py", base=no_checkpoint)
    assert e.value.code == 2 and capsys.readouterr().err == "error: prog needs --model.checkpoint PATH\n"


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--print-confg"], "unknown switch --print-confg — did you mean 'print-config'?"),
        (["--verbose"], "the switches are --help, --print-config"),
        (["--common.run-label", "--print-config"], "--common.run-label needs a value, not the option --print-config"),
    ],
)
def test_parse_config_refuses_bad_switches(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv, "prog.py")
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


def test_short_help_switch(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["-h"], "prog.py", "doc")
    assert e.value.code == 0 and "--common.seed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- processes
FRONT_DOOR = "import sys; from options.cli import parse_config; parse_config(sys.argv[1:], 'prog.py', 'The doc.')"


def front_door(*args, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-c", FRONT_DOOR, *args], cwd=REPO, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60)


def test_process_exits_2_with_one_line_and_no_traceback():
    out = front_door("--print-config", "--scheduler.max-epochs", "0", "--loss.label-smoothing", "1.5")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "error: scheduler.max_epochs: 0 must be in [1, 10000] (from --scheduler.max-epochs)\n"


@pytest.mark.parametrize("switch", ["--help", "--print-config"])
def test_output_into_a_closed_pipe_exits_quietly(switch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as with `| head -1` on a long text
    try:
        out = front_door(switch, stdout=write_end)
    finally:
        os.close(write_end)
    assert out.returncode == 0
    assert out.stderr == ""


# ----------------------------------------------------------------------------- round trip
def test_config_is_read_only():
    cfg = load_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.weight_decay = 1.0
    with pytest.raises(TypeError):
        cfg.image_augmentation.train[0]["scale"] = [0.5, 1.0]


def test_yaml_round_trip(tmp_path):
    cfg = load_config(["--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml"),
                       "--model.mobilevit.remove-layers", "5", "--optim.weight-decay", "0.123"])
    path = str(tmp_path / "saved.yaml")
    save_config(cfg, path)
    reloaded = from_dict(yaml.safe_load(open(path)))
    assert reloaded == cfg
    assert to_yaml(reloaded) == to_yaml(cfg)
    assert os.listdir(tmp_path) == ["saved.yaml"]  # no temp file left behind


def test_override_validates():
    cfg = override(load_config([]), {"model.num_classes": 10})
    assert cfg.model.num_classes == 10
    with pytest.raises(ConfigError):
        override(cfg, {"model.num_clases": 10})
    with pytest.raises(ConfigError, match="model.num_classes: 0 must be >= 1"):
        override(cfg, {"model.num_classes": 0})


def test_every_section_has_help():
    missing = [key for key, _, f in iter_keys() if not f.metadata.get("help")]
    assert missing == []


# ----------------------------------------------------------------------------- registries
def test_registry_rejects_duplicates_and_lists_known_names():
    reg = Registry("widget")

    @reg.register("alpha")
    def alpha():
        return 1

    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("alpha")(lambda: 2)
    assert reg.get("alpha") is alpha
    with pytest.raises(RegistryError) as e:
        reg.get("alpah")
    assert "known: alpha" in str(e.value) and "did you mean 'alpha'" in str(e.value)
    assert list(reg) == ["alpha"] and "alpha" in reg


def test_registry_with_a_config_key_accepts_only_its_choices():
    reg = Registry("optimizer", config_key="optim.name")
    with pytest.raises(RegistryError) as e:
        reg.register("lamb")
    assert "optim.name" in str(e.value) and "options/schema.py" in str(e.value)
    reg.register("sgd")(object)
    assert reg.missing() == ["adam", "adamw"]


# (module holding the registry, its name, modules whose import registers the entries)
REGISTRIES = [
    ("cvnets", "MODELS", ["cvnets"]),
    ("data.base", "DATASETS", ["data.tinyimagenet"]),
    ("data.samplers", "SAMPLERS", ["data.samplers"]),
    ("loss_fn.registry", "LOSSES", ["loss_fn"]),
    ("optim.optimizers", "OPTIMIZERS", ["optim"]),
    ("optim.schedulers", "SCHEDULERS", ["optim"]),
]


@pytest.mark.parametrize("module,name,definers", REGISTRIES, ids=[r[1] for r in REGISTRIES])
def test_registry_and_schema_list_the_same_names(module, name, definers):
    for definer in definers:
        importlib.import_module(definer)
    registry = getattr(importlib.import_module(module), name)
    assert registry.config_key is not None
    assert registry.missing() == []  # every name the schema accepts is registered
    assert set(registry.names()) == set(literal_choices(registry.config_key))  # and nothing else


def test_every_name_key_has_a_registry():
    name_keys = {key for key, _, _ in iter_keys() if key.endswith(".name")}
    registries = [getattr(importlib.import_module(module), name) for module, name, _ in REGISTRIES]
    assert {r.config_key for r in registries} == name_keys
