"""Knowledge distillation: the loss against hand-computed values, the frozen teacher, its checks
before training, and resume refusing another teacher."""
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import checkpoint as ckpt
from engine.commands import evaluate, train
from engine.teacher import load_teacher
from helpers import (LOGGER, REPO, child_env, ddp_command, fake_wnids, last_state, open_trainer, read_rows, tiny_args,
                     train_in_process, write_teacher)
from loss_fn import build_loss
from loss_fn.cross_entropy import CrossEntropy
from loss_fn.distillation import Distillation, Teacher, hard_distillation, soft_distillation
from options.config import load_config
from options.schema import DistillationConfig, LossConfig

B, C = 6, 5


class FixedLogits(nn.Module):
    """A 'model' that answers every batch with the same logits, and counts its calls."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, images):
        self.calls += 1
        return self.logits


def _np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, C, generator=g) * 2
    teacher = torch.randn(B, C, generator=g) * 2
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    images = torch.rand(B, 3, 8, 8, generator=g)
    return student, teacher, labels, images


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("soft_targets", [False, True])
def test_soft_loss_matches_a_numpy_computation(batch, temperature, soft_targets):
    student, teacher, labels, images = batch
    alpha, eps = 0.3, 0.1
    s, t = student.double().numpy(), teacher.double().numpy()
    targets = np.eye(C)[labels.numpy()]
    if soft_targets:  # what mixup hands the loss: a blend of two one-hot rows
        targets = 0.7 * targets + 0.3 * targets[::-1]
    log_ps, log_pt = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean() * temperature ** 2
    smoothed = targets * (1 - eps) + eps / C
    ce = -(smoothed * _np_log_softmax(s)).sum(axis=1).mean()

    assert soft_distillation(student, teacher, temperature).item() == pytest.approx(kl, rel=1e-5)
    loss = Distillation(Teacher(FixedLogits(teacher)), "soft", temperature, alpha, eps).train()
    given = torch.tensor(targets, dtype=torch.float32) if soft_targets else labels
    assert loss(student, given, images).item() == pytest.approx((1 - alpha) * ce + alpha * kl, rel=1e-5)


def test_alpha_zero_is_exactly_the_plain_cross_entropy_and_never_runs_the_teacher(batch):
    student, teacher, labels, images = batch
    stub = FixedLogits(teacher)
    distil = Distillation(Teacher(stub), "soft", 3.0, 0.0, 0.1).train()
    assert torch.equal(distil(student, labels, images), CrossEntropy(0.1).train()(student, labels))
    assert stub.calls == 0


def test_alpha_one_is_exactly_the_distillation_term(batch):
    student, teacher, labels, images = batch
    for kind, term in (("soft", soft_distillation(student, teacher, 2.0)), ("hard", hard_distillation(student, teacher))):
        distil = Distillation(Teacher(FixedLogits(teacher)), kind, 2.0, 1.0, 0.1).train()
        assert torch.equal(distil(student, labels, images), term)


def test_at_high_temperature_the_soft_term_becomes_matching_of_centred_logits(batch):
    # Hinton et al.: T^2 KL -> sum_c ((t_c - mean t) - (s_c - mean s))^2 / (2C) as T grows.
    student, teacher, _, _ = batch
    s, t = student.double().numpy(), teacher.double().numpy()
    d = (t - t.mean(axis=1, keepdims=True)) - (s - s.mean(axis=1, keepdims=True))
    limit = (d ** 2).sum(axis=1).mean() / (2 * C)
    assert soft_distillation(student, teacher, 100.0).item() == pytest.approx(limit, rel=0.02)
    assert abs(soft_distillation(student, teacher, 1.0).item() - limit) > 0.1 * limit  # far from it at T = 1


def test_hard_kind_learns_the_teacher_top_class_not_the_label(batch):
    student, teacher, labels, images = batch
    top = teacher.argmax(dim=1).numpy()
    assert (top != labels.numpy()).any()  # otherwise the test could not tell them apart
    expected = -_np_log_softmax(student.double().numpy())[np.arange(B), top].mean()
    assert hard_distillation(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    distil = Distillation(Teacher(FixedLogits(teacher)), "hard", 7.0, 1.0, 0.1).train()  # T plays no part
    assert distil(student, labels, images).item() == pytest.approx(expected, rel=1e-6)


def test_in_eval_mode_the_loss_is_the_plain_cross_entropy(batch):
    student, teacher, labels, images = batch
    stub = FixedLogits(teacher)
    distil = Distillation(Teacher(stub), "soft", 2.0, 0.5, 0.1).eval()
    assert torch.equal(distil(student, labels, images), F.cross_entropy(student, labels))
    assert stub.calls == 0


def test_the_loss_builder_needs_a_teacher_for_distillation():
    cfg = LossConfig(name="distillation", distillation=DistillationConfig(teacher="t.pt"))
    with pytest.raises(ValueError, match="needs its teacher"):
        build_loss(cfg)


def test_the_schema_asks_for_the_teacher_and_checks_the_ranges():
    with pytest.raises(ValueError, match="loss.distillation.teacher: null"):
        load_config(["--loss.name", "distillation"])
    for key, value in (("temperature", "0"), ("alpha", "1.5"), ("kind", "medium")):
        with pytest.raises(ValueError, match=f"loss.distillation.{key}"):
            load_config([f"--loss.distillation.{key}", value])


# ----------------------------------------------------------------------------- the teacher
def test_the_teacher_sees_its_own_input_size_and_normalisation(fake_root, tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    path = write_teacher(tmp_path / "t.pt", fake_wnids(fake_root), 0, "--sampler.crop-size", "48",
                         "--image-augmentation.mean", "0.5,0.4,0.3", "--image-augmentation.std", "0.2,0.25,0.3")
    cfg = load_config(["--loss.name", "distillation", "--loss.distillation.teacher", path, "--sampler.crop-size", "32",
                       "--common.channels-last", "false"])  # student: [0, 1] pixels at 32 px
    teacher, identity = load_teacher(cfg, fake_wnids(fake_root), torch.device("cpu"))
    state = ckpt.load(path)
    reference = load_config([], base=state["config"])
    import cvnets

    model = cvnets.build_model(reference.model, state["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    by_hand = F.interpolate((images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1),
                            size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = model(by_hand)
    assert torch.allclose(teacher(images), expected, atol=1e-4)
    assert identity == {"path": path, "sha256": ckpt.weights_digest(state["model"])}


def _distil_args(root, results, label, teacher, epochs=2, *extra):
    return tiny_args(root, results, label, epochs, "--loss.name", "distillation", "--loss.distillation.teacher",
                     str(teacher), "--loss.distillation.temperature", "2", *extra)


def test_the_teacher_stays_frozen_in_eval_mode_through_training(fake_root, tmp_path):
    path = write_teacher(tmp_path / "t.pt", fake_wnids(fake_root))
    trainer, folder = open_trainer(_distil_args(fake_root, tmp_path, "run", path, 1))
    teacher = trainer.parts.criterion.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(module.training))
    trainer.run(folder)
    folder.close(LOGGER)

    assert calls and not any(calls)  # it ran, every time in eval mode
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert teacher not in list(trainer.parts.model.modules())  # not part of the student (nor its DDP wrapper)
    stored = last_state(tmp_path / "run")["teacher"]
    assert stored == {"path": path, "sha256": ckpt.weights_digest(ckpt.load(path)["model"])}


def test_resume_refuses_another_teacher_and_accepts_the_same_one_moved(fake_root, tmp_path, capsys):
    wnids = fake_wnids(fake_root)
    first, other = write_teacher(tmp_path / "a.pt", wnids, 0), write_teacher(tmp_path / "b.pt", wnids, 1)
    used = tmp_path / "teacher.pt"
    shutil.copy(first, used)
    train_in_process(_distil_args(fake_root, tmp_path, "run", used, 2), stop_after_epoch=1)
    saved = (tmp_path / "run" / "checkpoint_last.pt").read_bytes()

    shutil.copy(other, used)  # the same path, other weights: refused
    capsys.readouterr()
    assert train(_distil_args(fake_root, tmp_path, "run", used, 2, "--common.resume", "auto")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would change the distillation teacher" in err
    assert "resume-allow-changes loss.distillation.teacher" in err
    assert (tmp_path / "run" / "checkpoint_last.pt").read_bytes() == saved

    # the original weights under another name: the same teacher, the run continues
    assert train(_distil_args(fake_root, tmp_path, "run", first, 2, "--common.resume", "auto")) == 0
    assert last_state(tmp_path / "run")["progress"]["epoch"] == 2

    # evaluating the distilled student needs no teacher
    for path in (first, other, used):
        os.remove(path)
    assert evaluate(["--model.checkpoint", str(tmp_path / "run" / "checkpoint_best.pt")]) == 0
    assert "top1:" in capsys.readouterr().out


def test_a_missing_teacher_file_is_one_line_and_exit_2_before_anything_is_written(fake_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train(_distil_args(fake_root, tmp_path, "run", tmp_path / "nowhere.pt"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss.distillation.teacher" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [("fewer", "predicts 3 classes"), ("other", "another class list")])
def test_a_teacher_of_another_class_list_is_refused_before_training(fake_root, tmp_path, capsys, change, message):
    wnids = fake_wnids(fake_root)
    theirs = wnids[:3] if change == "fewer" else [wnids[1], wnids[0], *wnids[2:]]
    path = write_teacher(tmp_path / "t.pt", theirs)
    assert train(_distil_args(fake_root, tmp_path, "run", path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_bf16_autocast_gives_the_float32_loss(batch):
    student, teacher, labels, images = batch
    distil = Distillation(Teacher(FixedLogits(teacher)), "soft", 2.0, 0.5, 0.1).train()
    full = distil(student, labels, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = distil(student.bfloat16(), labels, images)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(full.item(), rel=2e-2)


@pytest.mark.slow
def test_distillation_under_ddp_two_processes_on_cpu(fake_root, tmp_path):
    import subprocess

    path = write_teacher(tmp_path / "t.pt", fake_wnids(fake_root))
    done = subprocess.run(ddp_command(_distil_args(fake_root, tmp_path, "ddp", path, 1)), cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = read_rows(tmp_path / "ddp")
    assert row["train_images"] == 4 * 12 and np.isfinite(row["train_loss"])
    assert last_state(tmp_path / "ddp")["teacher"]["sha256"] == ckpt.weights_digest(ckpt.load(path)["model"])
