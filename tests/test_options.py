"""The config system: precedence, base inheritance, validation errors, round trip, registry."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from options import Registry, RegistryError
from options.config import ConfigError, from_dict, load_config, override, save_config, to_dict, to_yaml
from options.schema import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


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


def test_bases_merge_in_order_and_nest(tmp_path):
    os.makedirs(tmp_path / "sub")
    write(tmp_path / "sub" / "a.yaml", "scheduler: {max_epochs: 1, warmup_iterations: 5}\n")
    write(tmp_path / "sub" / "b.yaml", "base: a.yaml\nscheduler: {max_epochs: 2}\n")
    write(tmp_path / "c.yaml", "scheduler: {max_epochs: 3}\n")
    top = write(tmp_path / "top.yaml", "base: [sub/b.yaml, c.yaml]\n")
    cfg = load_config(["--common.config-file", top])
    assert cfg.scheduler.max_epochs == 3
    assert cfg.scheduler.warmup_iterations == 5


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: [b.yaml]\n")
    write(tmp_path / "b.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(["--common.config-file", str(tmp_path / "a.yaml")])


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
        ("--model.mobilevit.fusion", "none", "none"),
        ("--model.num-classes", "null", None),
        ("--common.run-label", "007", "007"),
        ("--model.resnet.depth", "50", 50),
        ("--optim.adamw.betas", "0.8,0.99", (0.8, 0.99)),
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


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["--optim.wieght-decay", "1"], ["optim.wieght-decay", "did you mean 'optim.weight_decay'"]),
        (["--optim.name", "adamx"], ["optim.name", "'adamx'", "sgd, adam, adamw", "did you mean"]),
        (["--optim.weight-decay", "abc"], ["optim.weight_decay", "'abc'", "not a number"]),
        (["--scheduler.max-epochs", "1.5"], ["scheduler.max_epochs", "not an integer"]),
        (["--common.compile", "maybe"], ["common.compile", "true or false"]),
        (["--common.config-file", "does/not/exist.yaml"], ["not found", "does/not/exist.yaml"]),
        (["--scheduler.name", "cosin"], ["did you mean 'cosine'"]),
    ],
)
def test_bad_flags_name_the_key_and_the_fix(argv, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim.weight_decy.*bad.yaml.*did you mean 'optim.weight_decay'"):
        load_config(["--common.config-file", path])


def test_bad_value_in_a_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "model: {resnet: {depth: 19}}\n")
    with pytest.raises(ConfigError, match=r"model.resnet.depth: 19 is not one of 18, 34, 50"):
        load_config(["--common.config-file", path])


def test_yaml_syntax_error_is_one_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "optim: {name: sgd\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--common.config-file", path])
    assert "bad.yaml" in str(e.value) and "\n" not in str(e.value)


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


def test_override_validates():
    cfg = override(load_config([]), {"model.num_classes": 10})
    assert cfg.model.num_classes == 10
    with pytest.raises(ConfigError):
        override(cfg, {"model.num_clases": 10})


def test_every_section_has_help():
    from options.config import iter_keys

    missing = [key for key, _, f in iter_keys() if not f.metadata.get("help")]
    assert missing == []


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


def run_cli(*args):
    return subprocess.run([sys.executable, "main_train.py", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_print_config_and_errors_exit_codes():
    tiny = "config/mobilevit_tiny.yaml"
    out = run_cli("--common.config-file", tiny, "--print-config", "--optim.weight-decay", "0.5")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    baseline = to_dict(load_config(["--common.config-file", os.path.join(REPO, tiny)]))
    baseline["common"]["config_file"] = tiny
    assert printed["optim"]["weight_decay"] == 0.5
    printed["optim"]["weight_decay"] = baseline["optim"]["weight_decay"]
    assert printed == baseline  # exactly that value changed

    bad = run_cli("--common.config-file", tiny, "--optim.wieght-decay", "1")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.wieght-decay" in lines[0] and "optim.weight_decay" in lines[0]
    assert "Traceback" not in bad.stderr


def test_cli_help_lists_every_key():
    from options.config import iter_keys

    out = run_cli("--help")
    assert out.returncode == 0
    for key, _, _ in iter_keys():
        assert f"--{key.replace('_', '-')}" in out.stdout
