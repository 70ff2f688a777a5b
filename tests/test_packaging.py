"""A non-editable install ships the configs, and a bare config name finds them from any folder."""
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO
from options.config import ConfigError, load_config, to_dict


def _tracked_configs():
    return sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "config", "**", "*"), recursive=True)
                  if os.path.isfile(p))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the source: setuptools writes build/ and *.egg-info into the folder it builds.
    source = shutil.copytree(REPO, tmp_path_factory.mktemp("src") / "cvnets-tiny", ignore=shutil.ignore_patterns(
        ".git", "datasets", "results", "build", "*.egg-info", "__pycache__", "tests"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = glob.glob(str(out / "*.whl"))
    return path


def test_the_wheel_holds_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = _tracked_configs()
    assert "config/mobilevit_tiny.yaml" in configs and "config/paper/authors_runs.json" in configs
    assert [c for c in configs if c not in names] == []


def test_an_installed_copy_resolves_a_bare_config_name_outside_any_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what installing a pure-Python wheel lays down
    script = ("from options.config import load_config; cfg = load_config(['--common.config-file', 'mobilevit_tiny']); "
              "print(cfg.common.config_file); print(cfg.model.mobilevit.mode)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    path, mode = done.stdout.splitlines()
    assert path == str(site / "config" / "mobilevit_tiny.yaml") and mode == "tiny"


def test_a_bare_name_is_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a checkout: config/mobilevit_tiny.yaml is no relative path here
    by_name = load_config(["--common.config-file", "mobilevit_tiny"])
    by_path = load_config(["--common.config-file", os.path.join(REPO, "config", "mobilevit_tiny.yaml")])
    assert by_name.common.config_file == by_path.common.config_file
    assert to_dict(by_name) == to_dict(by_path)
    paper = load_config(["--common.config-file", "paper/table3_no_vbs"])
    assert paper.common.config_file == os.path.join(REPO, "config", "paper", "table3_no_vbs.yaml")


def test_an_unknown_bare_name_lists_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(["--common.config-file", "mobilevit_tinyy"])
    message = str(e.value)
    assert "mobilevit_tinyy" in message and "did you mean 'mobilevit_tiny'" in message and "quickstart" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="config file not found: nothere.yaml"):
        load_config(["--common.config-file", "nothere.yaml"])  # a path stays a path
