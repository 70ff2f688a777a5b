"""engine/launchers.py: restarts, signals and GPUs of the local launcher (with a stand-in trainer),
the SLURM submission up to sbatch (a fake sbatch records the script), the launcher options, and
paper_tables' use of the launchers. No test here trains a model; tests/test_sweep.py does."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from engine import experiments, launchers
from engine.experiments import RunSpec
from tools import paper_tables

REPO = launchers.REPO

# Stands in for main_train.py: records each start, then exits with the status given for this
# attempt, or ("wait") waits for a signal and exits 128 + N as main_train does after saving.
# Under torchrun, ranks other than 0 record theirs in a file of their own.
FAKE_TRAINER = """\
import json, os, signal, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
rank = os.environ.get("RANK", "0")
starts = args["--starts"] + ("" if rank == "0" else ".rank" + rank)
attempt = sum(1 for _ in open(starts)) + 1 if os.path.exists(starts) else 1
with open(starts, "a") as f:
    f.write(json.dumps({"attempt": attempt, "pid": os.getpid(), "sid": os.getsid(0),
                        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
codes = args["--codes"].split(",")
code = codes[min(attempt, len(codes)) - 1]
if code == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if code == "wait":
    def stop(signum, frame):
        print("got " + signal.Signals(signum).name, flush=True)
        sys.exit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, stop)
    open(args["--ready"], "w").close()
    time.sleep(120)
    sys.exit(0)
print("training ..." if code == "0" else "error: dataset.root: /nowhere does not exist", flush=True)
sys.exit(int(code))
"""


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch) -> Path:
    script = tmp_path / "fake_main_train.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(launchers, "MAIN_TRAIN", str(script))
    return script


def spec(tmp_path: Path, label: str, codes: str) -> RunSpec:
    return RunSpec(str(tmp_path / "results" / label),
                   ("--starts", str(tmp_path / f"{label}.starts"), "--codes", codes,
                    "--ready", str(tmp_path / "ready")), group="grid")


def starts(tmp_path: Path, label: str) -> List[dict]:
    path = tmp_path / f"{label}.starts"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------- local launcher
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_runs_train_with_the_repositorys_main_train_from_any_working_directory(tmp_path, nproc):
    # Started from a folder without main_train.py, alone and as two DDP workers under torchrun:
    # each trainer resolves the run's config (--print-config prints it and exits).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = RunSpec(str(tmp_path / "r"), ("--common.config-file", os.path.join(REPO, "config", "quickstart.yaml"),
                                        "--common.seed", "7", "--print-config"))
    code = ("import sys\nfrom engine import launchers\nfrom engine.experiments import RunSpec\n"
            f"launcher = launchers.LocalLauncher(nproc_per_run={nproc}, gpus=[])\n"
            f"sys.exit(launcher.launch([RunSpec({run.run_dir!r}, {run.args!r})]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = Path(experiments.log_path(run)).read_text()
    assert log.count("seed: 7") == nproc, log[-3000:]
    assert experiments.read_record(run)["state"] == "finished"


@pytest.mark.slow
def test_a_ddp_run_whose_trainers_stop_after_saving_is_resumed(tmp_path, fake_trainer):
    # Both trainers exit 143 (saved) in the first attempt: the launcher's torchrun ends 143 too
    # (plain torchrun ends 1, which reads as a failure), so the run is resumed, not recorded failed.
    lines: List[str] = []
    run = spec(tmp_path, "stopped", "143,0")
    assert launchers.LocalLauncher(nproc_per_run=2, gpus=[], log=lines.append).launch([run]) == 0
    assert [s["attempt"] for s in starts(tmp_path, "stopped")] == [1, 2]
    assert len((tmp_path / "stopped.starts.rank1").read_text().splitlines()) == 2
    assert "stopped: stopped by SIGTERM, state saved; resuming (restart 1 of 3)" in lines
    assert experiments.read_record(run)["state"] == "finished"


def test_a_run_stopped_by_sigterm_is_resumed_and_failures_are_recorded(tmp_path, fake_trainer):
    lines: List[str] = []
    runs = [spec(tmp_path, "stopped", "143,0"), spec(tmp_path, "broken", "2"), spec(tmp_path, "ctrl_c", "130")]
    assert launchers.LocalLauncher(log=lines.append).launch(runs) == 1
    assert [s["attempt"] for s in starts(tmp_path, "stopped")] == [1, 2]
    assert "stopped: stopped by SIGTERM, state saved; resuming (restart 1 of 3)" in lines
    assert len(starts(tmp_path, "broken")) == len(starts(tmp_path, "ctrl_c")) == 1  # neither is restarted
    assert "broken: exit status 2: error: dataset.root: /nowhere does not exist" in lines
    record = experiments.read_record(runs[1])
    assert (record["state"], record["exit_code"], record["launcher"]) == ("failed", 2, "local")
    assert (record["group"], record["label"]) == ("grid", "broken")  # what a tracker will be told
    state = experiments.run_state(runs[1])
    assert state.state == "failed"
    assert state.text == "failed: exit status 2: error: dataset.root: /nowhere does not exist"
    assert experiments.run_state(runs[2]).state == "interrupted"
    log = Path(experiments.log_path(runs[0])).read_text()
    assert log.count("=== ") == 2 and log.count("training ...") == 1  # both attempts' output, appended


def test_a_rerun_that_finishes_clears_the_earlier_error(tmp_path, fake_trainer):
    run = spec(tmp_path, "retried", "2,0")
    assert launchers.LocalLauncher(log=lambda _: None).launch([run]) == 1
    assert experiments.read_record(run)["error"]
    assert launchers.LocalLauncher(log=lambda _: None).launch([run]) == 0
    record = experiments.read_record(run)
    assert record["state"] == "finished" and record.get("error") is None


class EndedAttempt:
    """What RestartPolicy reads of a trainer process that has ended."""

    def __init__(self, returncode: int, last_line: str = "") -> None:
        self.returncode, self._last = returncode, last_line

    def last_line(self) -> str:
        return self._last


@pytest.mark.parametrize("code, restarts, told_to_stop, again, state, error", [
    (0, 0, False, False, "finished", None),
    (143, 0, False, True, "restarted", None),  # SIGTERM from outside: saved, resume
    (138, 2, False, True, "restarted", None),  # SIGUSR1 (a time limit)
    (-9, 0, False, True, "restarted", None),  # killed (the OOM killer)
    (143, 3, False, False, "interrupted", "stopped by SIGTERM, state saved"),  # restarts used up
    (143, 0, True, False, "interrupted", "stopped by SIGTERM, state saved"),  # the launcher was stopped too
    (130, 0, False, False, "interrupted", "stopped by SIGINT, state saved"),  # a user's Ctrl-C
    (2, 0, False, False, "failed", "exit status 2: error: dataset.root: /nowhere does not exist"),
])
def test_restart_policy(tmp_path, code, restarts, told_to_stop, again, state, error):
    run = RunSpec(str(tmp_path / "r"), ())
    lines: List[str] = []
    attempt = EndedAttempt(code, "error: dataset.root: /nowhere does not exist")
    assert launchers.RestartPolicy(max_restarts=3).after(run, attempt, restarts, told_to_stop, lines.append) is again
    record = experiments.read_record(run)
    assert (record["state"], record["exit_code"], record.get("error")) == (state, code, error)
    if again:
        assert record["restarts"] == restarts + 1 and lines[-1].endswith(f"(restart {restarts + 1} of 3)")


@pytest.mark.slow
def test_restarts_are_bounded(tmp_path, fake_trainer):
    run = spec(tmp_path, "flaky", "kill")  # killed every time (SIGKILL, e.g. the OOM killer)
    code = launchers.LocalLauncher(policy=launchers.RestartPolicy(max_restarts=2), log=lambda _: None).launch([run])
    assert code == 1
    assert len(starts(tmp_path, "flaky")) == 3


def test_parallel_runs_get_one_gpu_each(tmp_path, fake_trainer):
    runs = [spec(tmp_path, f"r{i}", "0") for i in range(3)]
    lines: List[str] = []
    assert launchers.LocalLauncher(parallel=2, gpus=["0", "1"], log=lines.append).launch(runs) == 0
    gpus = [starts(tmp_path, f"r{i}")[0]["cuda"] for i in range(3)]
    assert gpus[:2] in (["0", "1"], ["1", "0"]) and gpus[2] in ("0", "1")
    assert sum(line.endswith(": finished") for line in lines) == 3


def test_parallel_cpu_runs_share_the_cores(tmp_path, fake_trainer, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    runs = [spec(tmp_path, f"r{i}", "0") for i in range(2)]
    assert launchers.LocalLauncher(parallel=2, gpus=[], log=lambda _: None).launch(runs) == 0
    assert [starts(tmp_path, f"r{i}")[0]["omp"] for i in range(2)] == ["4", "4"]
    assert [starts(tmp_path, f"r{i}")[0]["cuda"] for i in range(2)] == [os.environ.get("CUDA_VISIBLE_DEVICES")] * 2


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert launchers.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launchers.visible_gpus() == []


@pytest.mark.slow
def test_a_signal_to_the_launcher_is_passed_on_once_and_nothing_restarts(tmp_path, fake_trainer):
    run = spec(tmp_path, "long", "wait")
    code = (f"import sys\nfrom engine import launchers\nfrom engine.experiments import RunSpec\n"
            f"launchers.MAIN_TRAIN = {str(fake_trainer)!r}\nrun = RunSpec({run.run_dir!r}, {run.args!r})\n"
            "sys.exit(launchers.LocalLauncher().launch([run, RunSpec(run.run_dir + '2', run.args)]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert out.count("got SIGTERM") == 1  # once: the trainer runs in its own session
    (start,) = starts(tmp_path, "long")  # not restarted, and the second run never started
    assert start["sid"] == start["pid"]
    assert "passed on to the running runs" in out


@pytest.mark.slow
def test_runs_that_are_finished_or_held_by_a_live_trainer_are_skipped(tmp_path):
    done, held, todo = (RunSpec(str(tmp_path / name), ()) for name in ("done", "held", "todo"))
    os.makedirs(done.run_dir)
    Path(done.run_dir, "summary.json").write_text(json.dumps({"state": "finished", "finished": True}))
    # A live trainer elsewhere: a process that holds the run folder's lock.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engine.run_folder import RunLock; "
                               f"RunLock({held.run_dir!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lines: List[str] = []
        assert experiments.pending_runs([done, held, todo], lines.append) == [todo]
        assert lines[0] == "done: finished, skipped"
        assert lines[1].startswith(f"held: running (pid {holder.pid} on ") and lines[1].endswith("skipped")
        assert experiments.run_state(held).state == "running"
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- SLURM, up to the submission
FAKE_SBATCH = """#!/bin/sh
cp "$1" "$SBATCH_RECORD"
echo "Submitted batch job 123"
"""
FAKE_SACCT = """#!/bin/sh
printf 'JobID|State|NodeList\\n123_0|RUNNING|node7\\n123_1|PENDING|\\n'
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """sbatch (records the script it is given), srun (submitit looks for it) and sacct on PATH."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n"), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(tmp_path / "sbatch_script.sh"))
    return tmp_path / "sbatch_script.sh"


def test_slurm_submission_script(tmp_path, fake_slurm):
    runs = [RunSpec(str(tmp_path / "results" / name), ("--common.config-file", f"/configs/{name}.yaml"),
                    f"[{i}] {name}") for i, name in enumerate(("a", "b"))]
    options = launchers.SlurmOptions(partition="gpu", gpus_per_job=2, time_min=launchers.parse_minutes("4:00:00"),
                                     array_parallelism=1, cpus_per_task=8, mem_gb=launchers.parse_mem_gb("32G"),
                                     account="lab", setup=("source /opt/venv/bin/activate",))
    lines: List[str] = []
    assert launchers.SlurmLauncher(options, log=lines.append).launch(runs) == 0
    script = fake_slurm.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=240",
                 "#SBATCH --array=0-1%1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --account=lab",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=USR1@120",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR1", "source /opt/venv/bin/activate"):
        assert line in script.splitlines(), line
    assert script.count("--signal") == 1
    assert lines[:2] == ["[0] a: submitted as SLURM job 123_0", "[1] b: submitted as SLURM job 123_1"]
    # What each array task will run: a TrainJob of its run, DDP over the job's 2 GPUs.
    from submitit.core.utils import DelayedSubmission

    folder = Path(runs[0].launch_dir) / "submitit"
    job = DelayedSubmission.load(folder / "123_1_submitted.pkl")
    assert isinstance(job.function, launchers.TrainJob)
    assert (job.function.spec, job.function.nproc, job._timeout_countdown) == (runs[1], 2, options.max_timeouts)
    assert experiments.read_record(runs[1])["job_id"] == "123_1"
    # --status asks sacct; a queued or running job is not submitted twice.
    status = experiments.status_lines(runs)
    assert status[2].split() == ["[0]", "a", "starting", "slurm", "123_0", "(RUNNING)"]
    assert status[3].split() == ["[1]", "b", "queued", "slurm", "123_1", "(PENDING)"]
    assert experiments.pending_runs(runs, lines.append) == []
    assert lines[-1] == "[1] b: SLURM job 123_1 is pending, skipped"


def test_submitit_missing_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    with pytest.raises(launchers.LaunchError, match=r"pip install -e '\.\[cluster\]'"):
        launchers.SlurmLauncher(launchers.SlurmOptions()).launch([RunSpec(str(tmp_path / "r"), ())])
    code = paper_tables.main(["--run", "--rows", "3.6", "--results", str(tmp_path), "--launcher", "slurm"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {launchers.CLUSTER_HINT}"]


@pytest.mark.parametrize("text, minutes", [("240", 240), ("90:30", 91), ("4:00:00", 240), ("1-12", 2160),
                                           ("2-00:30:00", 2910)])
def test_slurm_time_formats(text, minutes):
    assert launchers.parse_minutes(text) == minutes


def parsed(argv: List[str]):
    import argparse

    parser = argparse.ArgumentParser()
    launchers.add_launch_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    launchers.check_launch_arguments(parser, args, rest)
    return launchers.launcher_from_args(args, log=lambda _: None)


def test_launcher_options_are_the_fields_of_slurm_options_and_the_restart_policy():
    default = parsed(["--launcher", "slurm"])
    assert default.options == launchers.SlurmOptions() and default.policy == launchers.RestartPolicy()
    chosen = parsed(["--launcher", "slurm", "--slurm.time", "1:30:00", "--slurm.mem", "512M", "--slurm.setup", "a",
                     "--slurm.setup", "b", "--slurm.executor", "local", "--slurm.signal-delay", "60",
                     "--max-restarts", "5"])
    assert chosen.options == launchers.SlurmOptions(time_min=90, mem_gb=0.5, setup=("a", "b"), executor="local",
                                                    signal_delay_s=60)
    assert chosen.policy.max_restarts == 5
    assert parsed(["--launcher", "slurm"]).options.setup == ()  # no list shared between parses
    local = parsed(["--parallel", "2", "--gpus", "0,1", "--nproc-per-run", "2"])
    assert (local.parallel, local.gpus, local.nproc, local.policy) == (2, ["0", "1"], 2, launchers.RestartPolicy())


def test_bad_slurm_values_and_misplaced_options(capsys):
    with pytest.raises(Exception, match="not a SLURM time"):
        launchers.parse_minutes("4h")
    with pytest.raises(Exception, match="with a unit"):
        launchers.parse_mem_gb("32")
    assert launchers.parse_mem_gb("512M") == 0.5
    with pytest.raises(SystemExit):
        parsed(["--launcher", "slurm", "--slurm.time", "4h"])
    assert "argument --slurm.time: '4h' is not a SLURM time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper_tables.main(["--run", "--rows", "3.6", "--slurm.partition", "gpu"])
    assert "--slurm.partition need --launcher slurm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper_tables.main(["--list", "--parallel", "2"])
    assert "only apply when training" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the tools' entry points
# (paper_tables' use of a launcher: test_paper_tables.py)
@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "tools.paper_tables"], ["tools/paper_tables.py"], ["-m", "tools.sweep"],
                                     ["tools/sweep.py"]])
def test_tools_run_as_modules_and_as_files(command, tmp_path):
    args = ["--list"] if "paper_tables" in command[-1] else ["--status", str(tmp_path)]
    done = subprocess.run([sys.executable, *command, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    if "paper_tables" in command[-1]:
        assert done.returncode == 0, done.stderr
        assert "config/paper/table3_remove_3_4_no_fusion.yaml" in done.stdout
    else:
        assert done.returncode == 2 and "is not a sweep folder" in done.stderr
