"""How the tools start training runs: one after another, N at once, or as SLURM jobs.

tools/sweep.py and tools/paper_tables.py describe each run as a RunSpec (its run folder and the
main_train.py arguments that train into it) and hand the list to a launcher:

- LocalLauncher(parallel=1): one run after another, its output on the terminal (the default).
- LocalLauncher(parallel=N): N runs at once, each on its own GPU (CUDA_VISIBLE_DEVICES) when
  the machine has GPUs, otherwise N CPU processes sharing the cores.
- SlurmLauncher: one job per run, submitted as a job array through submitit; a job with several
  GPUs trains with DDP through `python -m torch.distributed.run`.

Every run is a separate process, `python main_train.py ARGS`, that continues its run folder
(`--common.resume auto`). The run folder's lock (engine/run_folder.py) makes sure that no two
trainers ever share a folder; the launchers never start a run whose lock is held and never
touch a lock themselves.

Stops. main_train saves and exits 128 + N on SIGINT, SIGTERM or SIGUSR1. A run stopped by
SIGTERM or SIGUSR1 (or killed) while its launcher was not told to stop is resumed at once,
up to `max_restarts` times. Ctrl-C or SIGTERM to the local launcher is passed on to its runs
once (they run in their own sessions, so a terminal's Ctrl-C reaches them only this way); they
save and the launcher exits 128 + N. Under SLURM the job gets SIGUSR1 `signal_delay_s` seconds
before its time limit (submitit's `--signal`, set to USR1 here because that is the signal the
trainer saves on), the trainer saves, submitit's checkpoint() hook requeues the job, and the
requeued job resumes the run. A preemption's SIGTERM reaches every process of the job: the
trainer saves and SLURM requeues the job (`--requeue`). A local launcher that is killed outright
(SIGKILL) leaves its runs going; a later launch finds them holding their locks and skips them.

Records, beside the run folders under `<results>/_launch/`: `<label>.json` per run (launcher,
pid or SLURM job id, attempts, requeues, last exit status and error line), `logs/<label>.log`
(the trainer's output, every attempt appended) and `submitit/` (submitit's job files).
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import difflib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from engine.run_folder import is_locked, read_lock_holder, run_status
from engine.signals import STOP_SIGNALS, handling
from utils.files import write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_TRAIN = os.path.join(REPO, "main_train.py")
LAUNCH = "_launch"  # launcher records, beside the run folders
CLUSTER_HINT = "the slurm launcher needs submitit: pip install -e '.[cluster]'"
PREEMPT_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # which signal submitit's job process treats as "checkpoint, requeue"
RESUMABLE = (128 + signal.SIGTERM, 128 + signal.SIGUSR1)  # saved after a stop from outside, not a user's Ctrl-C

Log = Callable[[str], None]


class LaunchError(Exception):
    """A launcher cannot start (missing submitit, no SLURM here, a refused submission); one line."""


class RunFailed(Exception):
    """A run ended without finishing (raised inside a SLURM job, so that submitit records it)."""


# ----------------------------------------------------------------------------- runs and records
@dataclass(frozen=True)
class RunSpec:
    """One training run: its folder and the main_train.py arguments that train into it."""

    run_dir: str
    args: Tuple[str, ...]
    name: str = ""  # what log lines call the run; default its folder name

    @property
    def label(self) -> str:
        return os.path.basename(os.path.normpath(self.run_dir))

    @property
    def title(self) -> str:
        return self.name or self.label

    @property
    def launch_dir(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.run_dir)), LAUNCH)


def record_path(spec: RunSpec) -> str:
    return os.path.join(spec.launch_dir, f"{spec.label}.json")


def log_path(spec: RunSpec) -> str:
    return os.path.join(spec.launch_dir, "logs", f"{spec.label}.log")


def read_record(spec: RunSpec) -> Dict[str, Any]:
    """What the launchers wrote about the run ({} when nothing yet)."""
    try:
        with open(record_path(spec), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_record(spec: RunSpec, **fields: Any) -> None:
    """Merge `fields` into the run's record (one writer at a time: the launcher, then its job).
    A run that starts again or finishes drops the error of an earlier attempt."""
    if fields.get("state") in ("running", "finished"):
        fields.setdefault("error", None)
    write_json(record_path(spec), {**read_record(spec), **fields, "updated": time.time()})


def train_command(spec: RunSpec, nproc: int = 1) -> List[str]:
    """The command that trains `spec`: main_train.py, under torchrun-style DDP for nproc > 1."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                MAIN_TRAIN, *spec.args]
    return [sys.executable, MAIN_TRAIN, *spec.args]


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    if code - 128 in STOP_SIGNALS:
        return f"stopped by {_signal_name(code - 128)}, state saved"
    return f"exit status {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ----------------------------------------------------------------------------- one trainer process
class TrainerProcess:
    """A running trainer whose output is appended to the run's launch log (and echoed here).

    A thread collects the exit status, so that a signal handler can wait for the process:
    Popen.wait() holds a lock while it blocks, and a handler that interrupts it and waits
    again would deadlock on that lock.
    """

    def __init__(self, spec: RunSpec, command: Sequence[str], env: Optional[Dict[str, str]] = None,
                 echo: bool = False, own_session: bool = True, ignore: Sequence[int] = (),
                 cwd: Optional[str] = None) -> None:
        self.spec = spec
        self.log = log_path(spec)
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            out.flush()
            self._start = out.tell()
            self.proc = subprocess.Popen(
                list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                start_new_session=own_session,
                # SIG_IGN survives exec; torchrun then leaves the signal to its workers (see TrainJob).
                preexec_fn=(lambda: [signal.signal(s, signal.SIG_IGN) for s in ignore]) if ignore else None,
            )
        self.returncode: Optional[int] = None
        self._done = threading.Event()
        threading.Thread(target=self._reap, daemon=True).start()
        self._echo = threading.Thread(target=self._copy_output, daemon=True) if echo else None
        if self._echo is not None:
            self._echo.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _reap(self) -> None:
        self.returncode = self.proc.wait()
        self._done.set()

    def _copy_output(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may straddle two reads
        with open(self.log, "rb") as f:
            f.seek(self._start)
            while True:
                finished = self._done.is_set()
                chunk = f.read(65536)
                if chunk:
                    sys.stdout.write(decoder.decode(chunk))
                    sys.stdout.flush()
                elif finished:
                    return
                else:
                    time.sleep(0.1)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """The exit status, or None if still running after `timeout` seconds."""
        if timeout is None:
            while not self._done.wait(1.0):  # short waits keep signal handlers responsive
                pass
        elif not self._done.wait(timeout):
            return None
        if self._echo is not None:
            self._echo.join()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if not self._done.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def last_line(self) -> str:
        """The last non-empty output line of this attempt: main_train's one-line error."""
        with open(self.log, "rb") as f:
            f.seek(max(self._start, os.path.getsize(self.log) - 65536))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()]
        return next((line for line in reversed(lines) if line), "")


def _ending(code: int, last_line: str) -> str:
    how = describe_exit(code)
    return f"{how}: {last_line}" if last_line and code > 0 and code - 128 not in STOP_SIGNALS else how


# ----------------------------------------------------------------------------- what to start
def pending_runs(runs: Sequence[RunSpec], log: Log = print) -> List[RunSpec]:
    """The runs to start. Finished runs are skipped; so are runs a live trainer holds (its lock)
    and runs still queued or running as SLURM jobs, which starting again would only duplicate."""
    queued = queue_states(runs)
    todo = []
    for spec in runs:
        status = run_status(spec.run_dir)
        job = read_record(spec).get("job_id")
        if status.state == "finished":
            log(f"{spec.title}: finished, skipped")
        elif status.state == "running":
            log(f"{spec.title}: running ({_holder(spec.run_dir)}), skipped")
        elif job in queued and queued[job] in ACTIVE_SLURM_STATES:
            log(f"{spec.title}: SLURM job {job} is {queued[job].lower()}, skipped")
        else:
            todo.append(spec)
    return todo


def _holder(run_dir: str) -> str:
    holder = read_lock_holder(run_dir)
    return f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "lock held"


# ----------------------------------------------------------------------------- local
def visible_gpus() -> List[str]:
    """GPU ids the local launcher spreads runs over: CUDA_VISIBLE_DEVICES when set, else every
    GPU nvidia-smi lists, else none (found without importing torch, which takes seconds)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass
class _Active:
    spec: RunSpec
    proc: TrainerProcess
    slot: int
    restarts: int = 0


class LocalLauncher:
    """Runs on this machine, `parallel` at a time, each in its own process (and session)."""

    def __init__(self, parallel: int = 1, gpus: Optional[Sequence[str]] = None, max_restarts: int = 3,
                 log: Log = print) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.parallel = parallel
        self.gpus = list(visible_gpus() if gpus is None else gpus)
        self.max_restarts = max_restarts
        self.log = log
        self._signal: Optional[int] = None
        self._announced = False
        self._active: Dict[int, _Active] = {}

    def launch(self, runs: Sequence[RunSpec]) -> int:
        """Train every run; returns 0 when all finished, 1 when one did not, 128 + N when the
        launcher itself was stopped by signal N (its runs saved first)."""
        queue = deque(runs)
        at_once = min(self.parallel, len(runs))
        if at_once > 1 and self.gpus and at_once > len(self.gpus):
            self.log(f"note: {at_once} runs at once share {len(self.gpus)} GPU(s)")
        failed = 0
        with self._passing_on_signals():
            while self._active or (queue and self._signal is None):
                while queue and self._signal is None and len(self._active) < self.parallel:
                    slot = min(set(range(self.parallel)) - set(self._active))
                    spec = queue.popleft()
                    self._active[slot] = _Active(spec, self._start(spec, slot), slot)
                ended = self._wait_any()
                if self._signal is not None and not self._announced:  # printed here, not in the handler
                    self._announced = True
                    self.log(f"{_signal_name(self._signal)}: passed on to the running runs, which save and stop")
                for slot in ended:
                    failed += not self._finish(self._active.pop(slot))
        if self._signal is not None:
            return 128 + self._signal
        return 1 if failed or queue else 0

    def _env(self, slot: int) -> Optional[Dict[str, str]]:
        if self.parallel == 1:
            return None  # today's behaviour: the run sees what this shell sees
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        elif "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))  # no oversubscription
        return env

    def _start(self, spec: RunSpec, slot: int, attempt: int = 1) -> TrainerProcess:
        env = self._env(slot)
        proc = TrainerProcess(spec, train_command(spec), env=env, echo=self.parallel == 1)
        where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env and self.gpus else ""
        if self.parallel == 1:
            self.log(f"{spec.title}: training")
        else:
            shown = os.path.relpath(proc.log)
            self.log(f"{spec.title}: started{where}, output in {proc.log if shown.startswith('..') else shown}")
        update_record(spec, launcher="local", pid=proc.pid, host=socket.gethostname(), state="running",
                      attempt=attempt, started=time.time(), log=proc.log, job_id=None)
        return proc

    def _wait_any(self) -> List[int]:
        while True:
            ended = [slot for slot, a in self._active.items() if a.proc.wait(0) is not None]
            if ended or not self._active or (self._signal is not None and not self._announced):
                return ended
            time.sleep(0.2)

    def _finish(self, active: _Active) -> bool:
        """Record how a run ended; restart it when it was stopped from outside. True if it is fine."""
        spec, code = active.spec, active.proc.returncode
        if code == 0:
            update_record(spec, state="finished", exit_code=0, ended=time.time())
            if self.parallel > 1:
                self.log(f"{spec.title}: finished")
            return True
        resumable = code in RESUMABLE or code < 0
        if resumable and self._signal is None and active.restarts < self.max_restarts:
            restarts = active.restarts + 1
            self.log(f"{spec.title}: {describe_exit(code)}; resuming (restart {restarts} of {self.max_restarts})")
            update_record(spec, state="restarted", exit_code=code, restarts=restarts)
            self._active[active.slot] = _Active(spec, self._start(spec, active.slot, restarts + 1), active.slot,
                                                restarts)
            return True
        ending = _ending(code, active.proc.last_line())
        stopped = code - 128 in STOP_SIGNALS or code < 0
        update_record(spec, state="interrupted" if stopped else "failed", exit_code=code, error=ending,
                      ended=time.time())
        self.log(f"{spec.title}: {ending}")
        return False

    @contextlib.contextmanager
    def _passing_on_signals(self) -> Iterator[None]:
        """Ctrl-C, SIGTERM or SIGUSR1 here: start nothing more and pass the signal on, once per
        arrival, to the runs (which save and stop; a second Ctrl-C stops them at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._signal is None:
                self._signal = signum
            for active in self._active.values():
                active.proc.send_signal(signum)

        with handling(STOP_SIGNALS, handler):
            yield


# ----------------------------------------------------------------------------- SLURM through submitit
def import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise LaunchError(CLUSTER_HINT) from None
    return submitit


def parse_minutes(text: str) -> int:
    """A SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a SLURM time (e.g. 240, 4:00:00 or 1-00:00:00)")
    days, a, b, c = (int(g) if g else 0 for g in match.groups())
    if match.group(1):  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + a) * 60 + b) * 60 + c
    elif match.group(4):  # HH:MM:SS
        seconds = (a * 60 + b) * 60 + c
    else:  # MM[:SS]
        seconds = a * 60 + b
    if seconds < 60:
        raise argparse.ArgumentTypeError(f"{text!r} is under a minute")
    return math.ceil(seconds / 60)


def parse_mem_gb(text: str) -> float:
    """Memory per job as sbatch writes it (32G, 500M, 1T) in GB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT])B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size with a unit (e.g. 32G or 500M)")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[match.group(2).upper()]
    return float(match.group(1)) * scale


@dataclass(frozen=True)
class SlurmOptions:
    """The job settings; one job per run, all runs of a launch in one job array."""

    partition: Optional[str] = None
    gpus_per_job: int = 1  # > 1: DDP over the job's GPUs on one node
    time_min: int = 240
    array_parallelism: Optional[int] = None  # jobs of the array running at once (None: the cluster's limit)
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    signal_delay_s: int = 120  # SIGUSR1 this long before the time limit: the save and the requeue fit in it
    max_timeouts: int = 10  # requeues after hitting the time limit (preemptions do not count)
    setup: Tuple[str, ...] = ()  # shell lines run before the job (module load ..., source venv/bin/activate)
    job_name: str = "cvnets"
    executor: str = "slurm"  # "local": submitit's LocalExecutor runs the same jobs as processes here

    def parameters(self) -> Dict[str, Any]:
        """submitit.AutoExecutor parameters (the slurm_ ones are ignored by the local executor)."""
        params: Dict[str, Any] = dict(
            name=self.job_name, timeout_min=self.time_min, tasks_per_node=1, cpus_per_task=self.cpus_per_task,
            mem_gb=self.mem_gb, gpus_per_node=self.gpus_per_job if self.executor == "slurm" else self._local_gpus(),
            slurm_partition=self.partition, slurm_array_parallelism=self.array_parallelism,
            slurm_account=self.account, slurm_qos=self.qos, slurm_constraint=self.constraint,
            slurm_exclude=self.exclude, slurm_signal_delay_s=self.signal_delay_s,
            slurm_setup=[f"export {PREEMPT_ENV}=USR1", *self.setup],
            # submitit writes --signal=USR2@delay unless told otherwise; the trainer saves on USR1.
            # --requeue: a preempted job goes back to the queue even where JobRequeue=0 is the default.
            slurm_additional_parameters={"signal": f"USR1@{self.signal_delay_s}", "requeue": True},
        )
        return {k: v for k, v in params.items() if v is not None}

    def _local_gpus(self) -> int:
        return min(self.gpus_per_job, len(visible_gpus()))


@contextlib.contextmanager
def _preempt_signal_env() -> Iterator[None]:
    """Jobs of the local executor inherit this process's environment: make their submitit use USR1."""
    before = os.environ.get(PREEMPT_ENV)
    os.environ[PREEMPT_ENV] = "USR1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PREEMPT_ENV, None)
        else:
            os.environ[PREEMPT_ENV] = before


class TrainJob:
    """What a submitit job runs: one training run, resumed across stops, preemptions and requeues.

    submitit calls checkpoint() from its handler of the preemption/time-limit signal (USR1
    here, see SlurmOptions.parameters); it waits until the trainer has saved and returns the
    job to run after the requeue (a fresh TrainJob, which resumes the run folder). Under
    SLURM every process of the job gets the signal from SLURM itself, so the trainer is not
    signalled again from here; under the local executor it is (it runs in its own session).
    """

    def __init__(self, spec: RunSpec, nproc: int = 1, cwd: Optional[str] = None, grace_s: float = 90,
                 max_restarts: int = 3) -> None:
        self.spec, self.nproc, self.cwd = spec, nproc, cwd
        self.grace_s, self.max_restarts = grace_s, max_restarts
        self._proc: Optional[TrainerProcess] = None
        self._stopped_by: Optional[int] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_proc": None, "_stopped_by": None}

    @staticmethod
    def _under_slurm() -> bool:
        return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"

    def __call__(self) -> str:
        import submitit

        spec = self.spec
        update_record(spec, state="running", host=socket.gethostname(), job_id=submitit.JobEnvironment().job_id,
                      slurm_restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
        with handling((signal.SIGINT, signal.SIGTERM), self._on_stop):
            restarts = 0
            while True:
                self._wait_for_lock()
                self._proc = self._start()
                code = self._proc.wait()
                if code == 0:
                    update_record(spec, state="finished", exit_code=0)
                    return "finished"
                resumable = code in RESUMABLE or code < 0
                if resumable and self._stopped_by is None and restarts < self.max_restarts:
                    restarts += 1
                    print(f"{spec.title}: {describe_exit(code)}; resuming (restart {restarts} of {self.max_restarts})",
                          flush=True)
                    continue
                ending = _ending(code, self._proc.last_line())
                update_record(spec, state="failed" if code > 0 and code - 128 not in STOP_SIGNALS else "interrupted",
                              exit_code=code, error=ending)
                raise RunFailed(f"{spec.title}: {ending}")

    def _start(self) -> TrainerProcess:
        env = dict(os.environ)
        ignore: Tuple[int, ...] = ()
        if self.nproc > 1:
            if self._under_slurm():
                # SLURM signals every worker itself; torchrun passing the signal on as well would
                # make it a second one, which stops a trainer at once instead of after its save.
                env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
                ignore = STOP_SIGNALS
            else:
                env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
        return TrainerProcess(self.spec, train_command(self.spec, self.nproc), env=env, echo=True,
                              own_session=not self._under_slurm(), ignore=ignore, cwd=self.cwd)

    def _wait_for_lock(self) -> None:
        """A trainer of this run may still be saving (e.g. the job before a requeue, on another
        node). Wait for it; if it outlives the grace time the new trainer refuses with one line."""
        deadline = time.monotonic() + self.grace_s
        while is_locked(self.spec.run_dir) and time.monotonic() < deadline:
            time.sleep(1.0)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._stopped_by = signum
        print(f"{self.spec.title}: {_signal_name(signum)} received; the trainer saves and stops", flush=True)
        if not self._under_slurm() and self._proc is not None:
            self._proc.send_signal(signum)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on the preemption / time-limit signal: let the trainer save, then requeue."""
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        if proc is not None and proc.wait(0) is None:
            if not self._under_slurm():
                proc.send_signal(signal.SIGUSR1)
            if proc.wait(self.grace_s) is None:
                print(f"{self.spec.title}: the trainer is still saving after {self.grace_s:.0f} s", flush=True)
        requeues = int(read_record(self.spec).get("requeues", 0)) + 1
        update_record(self.spec, state="requeued", requeues=requeues, requeued_at=time.time())
        print(f"{self.spec.title}: requeued ({requeues}x); the next job resumes the run", flush=True)
        return DelayedSubmission(TrainJob(self.spec, self.nproc, self.cwd, self.grace_s, self.max_restarts))


class SlurmLauncher:
    """Submits one job per run (a job array) through submitit; returns once they are queued,
    or with wait=True once they have all ended."""

    def __init__(self, options: SlurmOptions, wait: bool = False, max_restarts: int = 3, log: Log = print) -> None:
        self.options, self.wait, self.max_restarts, self.log = options, wait, max_restarts, log

    def launch(self, runs: Sequence[RunSpec]) -> int:
        if not runs:
            return 0
        submitit = import_submitit()
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        o = self.options
        folder = os.path.join(runs[0].launch_dir, "submitit")
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=o.executor, slurm_max_num_timeout=o.max_timeouts,
                                             local_max_num_timeout=o.max_timeouts)
        except RuntimeError as e:  # SlurmExecutor: no srun on PATH
            raise LaunchError(f"cannot submit to SLURM here ({e}); run this on the cluster's login node, "
                              "or use --launcher local") from None
        executor.update_parameters(**o.parameters())
        grace = max(10.0, o.signal_delay_s - 30.0)  # leave time for the requeue itself
        jobs = [TrainJob(spec, o.gpus_per_job, os.getcwd(), grace, self.max_restarts) for spec in runs]
        try:
            with _preempt_signal_env(), executor.batch():
                submitted = [executor.submit(job) for job in jobs]
        except (OSError, FailedJobError, FailedSubmissionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LaunchError(f"submission failed: {first}") from None
        kind = "SLURM" if o.executor == "slurm" else "local submitit"
        for spec, job in zip(runs, submitted):
            update_record(spec, launcher=o.executor if o.executor == "slurm" else "submitit-local", job_id=job.job_id,
                          submitit_folder=folder, state="queued", submitted=time.time(), pid=None)
            self.log(f"{spec.title}: submitted as {kind} job {job.job_id}")
        if not self.wait:
            self.log(f"{len(submitted)} job(s) submitted; follow them with --status")
            return 0
        poll = 60.0 if o.executor == "slurm" else 1.0
        while not all(job.done() for job in submitted):
            time.sleep(poll)
        return 0 if all(run_status(spec.run_dir).state == "finished" for spec in runs) else 1


# ----------------------------------------------------------------------------- status
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                       "COMPLETING", "RESIZING", "SUSPENDED", "PREEMPTED")


def queue_states(runs: Sequence[RunSpec]) -> Dict[str, str]:
    """{SLURM job id: state} of the runs' recorded jobs, from sacct (through submitit); {} where
    sacct or submitit is missing, e.g. away from the cluster."""
    records = [read_record(spec) for spec in runs]
    wanted = [r for r in records if r.get("launcher") == "slurm" and r.get("job_id")]
    if not wanted or shutil.which("sacct") is None:
        return {}
    try:
        from submitit.slurm.slurm import SlurmJob
    except ImportError:
        return {}
    jobs = [SlurmJob(folder=r.get("submitit_folder") or ".", job_id=str(r["job_id"])) for r in wanted]
    return {job.job_id: job.state.split()[0] for job in jobs}


@dataclass(frozen=True)
class RunState:
    """One line of --status: the run's state and the job that runs it."""

    state: str  # pending, queued, running, finished, failed, interrupted, requeued
    text: str  # the state with progress and detail, e.g. "failed 2/10: error: disk full ..."
    job: str = ""  # "slurm 1234_1 (RUNNING)", "pid 4321"
    progress: str = ""  # "2/10": epochs done of the run's total, when known

    @property
    def short(self) -> str:
        return f"{self.state} {self.progress}" if self.progress and self.state != "finished" else self.state


def run_state(spec: RunSpec, queued: Optional[Dict[str, str]] = None) -> RunState:
    """What the run folder and the launch record together say about a run."""
    status, record = run_status(spec.run_dir), read_record(spec)
    done = f"{status.epochs_done}/{status.max_epochs}" if status.max_epochs else ""
    progress = f" {done}" if done else ""
    job_id = record.get("job_id")
    queue = (queued or {}).get(str(job_id)) if job_id else None
    job = f"{record.get('launcher', 'slurm')} {job_id}" + (f" ({queue})" if queue else "") if job_id else ""
    # SLURM counts every requeue of the job (submitit's and its own preemptions); ours only the former.
    requeues = max(int(record.get("requeues") or 0), int(record.get("slurm_restarts") or 0))
    if status.state == "running":
        return RunState("running", f"running{progress} ({_holder(spec.run_dir)})", job, done)
    if status.state == "finished":
        return RunState("finished", status.describe() + (f" (requeued {requeues}x)" if requeues else ""), job, done)
    if status.state == "failed":
        return RunState("failed", status.describe(), job, done)
    if record.get("state") == "failed" and record.get("error"):  # died before its folder said so
        return RunState("failed", f"failed{progress}: {record['error']}", job, done)
    if record.get("state") == "requeued" or (requeues and record.get("state") in ("queued", "running")):
        return RunState("requeued", f"preempted, requeued{progress} ({requeues}x)", job, done)
    if status.state == "interrupted":
        return RunState("interrupted", status.describe(), job, done)
    if record.get("state") == "interrupted":  # stopped before its folder said anything
        return RunState("interrupted", f"interrupted: {record.get('error')}", job)
    if record.get("state") == "queued":
        return RunState("queued", "starting" if queue == "RUNNING" else "queued", job)
    return RunState("pending", "pending", job)


def status_lines(runs: Sequence[RunSpec]) -> List[str]:
    """An aligned table: one line per run with its state and job, and a count per state."""
    queued = queue_states(runs)
    states = [run_state(spec, queued) for spec in runs]
    lines = format_table(("run", "state", "job"), [(spec.title, s.text, s.job) for spec, s in zip(runs, states)])
    counts: Dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return lines


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Left-aligned columns under a header and a rule, for terminals (the tools' CSV is for tools)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{str(c):<{w}}" for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher options shared by tools/sweep.py and tools/paper_tables.py."""
    group = parser.add_argument_group("launching runs")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: on this machine (default); slurm: one job per run through submitit")
    group.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="local: N runs at once, one GPU each when there are GPUs (default 1: one after another)")
    group.add_argument("--gpus", metavar="IDS", help="local: GPU ids to spread runs over, e.g. 0,1 "
                       "(default: CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists)")
    group.add_argument("--max-restarts", type=int, default=3, metavar="N",
                       help="resume a run stopped by SIGTERM/SIGUSR1 or killed up to N times (default 3)")
    slurm = parser.add_argument_group("SLURM (with --launcher slurm; needs pip install -e '.[cluster]')")
    slurm.add_argument("--slurm.partition", dest="slurm_partition", metavar="NAME")
    slurm.add_argument("--slurm.gpus-per-job", dest="slurm_gpus_per_job", type=int, default=1, metavar="G",
                       help="GPUs per run on one node; G > 1 trains with DDP (torchrun) inside the job (default 1)")
    slurm.add_argument("--slurm.time", dest="slurm_time", type=parse_minutes, default=240, metavar="TIME",
                       help="time limit per job, e.g. 4:00:00; a run that needs longer is requeued and resumed "
                       "(default 4 h)")
    slurm.add_argument("--slurm.array-parallelism", dest="slurm_array_parallelism", type=int, metavar="N",
                       help="jobs running at once (default: as many as the cluster allows)")
    slurm.add_argument("--slurm.cpus-per-task", dest="slurm_cpus_per_task", type=int, metavar="N",
                       help="CPUs per job (DataLoader workers + 1 per GPU; default: the cluster's)")
    slurm.add_argument("--slurm.mem", dest="slurm_mem", type=parse_mem_gb, metavar="SIZE",
                       help="memory per job, e.g. 32G")
    slurm.add_argument("--slurm.account", dest="slurm_account", metavar="NAME")
    slurm.add_argument("--slurm.qos", dest="slurm_qos", metavar="NAME")
    slurm.add_argument("--slurm.constraint", dest="slurm_constraint", metavar="FEATURES")
    slurm.add_argument("--slurm.exclude", dest="slurm_exclude", metavar="NODES")
    slurm.add_argument("--slurm.signal-delay", dest="slurm_signal_delay", type=int, default=120, metavar="S",
                       help="SIGUSR1 this many seconds before the time limit; the trainer saves (default 120)")
    slurm.add_argument("--slurm.max-timeouts", dest="slurm_max_timeouts", type=int, default=10, metavar="N",
                       help="requeues after reaching the time limit (preemptions do not count; default 10)")
    slurm.add_argument("--slurm.setup", dest="slurm_setup", action="append", default=[], metavar="LINE",
                       help="shell line run in the job first, e.g. 'source .venv/bin/activate' (repeatable)")
    slurm.add_argument("--slurm.job-name", dest="slurm_job_name", default="cvnets", metavar="NAME")
    slurm.add_argument("--slurm.executor", dest="slurm_executor", choices=("slurm", "local"), default="slurm",
                       help="local: run the same submitit jobs as processes on this machine (the cluster "
                       "code path: job files, USR1, requeue) without a cluster")
    slurm.add_argument("--wait", action="store_true", help="slurm: wait until every job has ended")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: Sequence[str],
                    running: bool = True) -> None:
    """Refuse a misspelt --slurm.* option (it would otherwise pass for a config key), options that
    would be ignored: any launcher option when nothing is launched (`running` False), and the
    other launcher's options."""
    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--slurm.")]
    for word in overrides:
        name = word.split("=", 1)[0]
        if name.startswith("--slurm."):
            close = difflib.get_close_matches(name, known, n=1)
            parser.error(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else
                                                      f"; the SLURM options are {', '.join(known)}"))
    if not running:
        names = ["launcher", "parallel", "gpus", "max_restarts", "wait"]
        names += [n for n in vars(args) if n.startswith("slurm_")]
        given = [n for n in names if getattr(args, n) != parser.get_default(n)]
        if given:
            parser.error(f"launcher options ({', '.join(_flag(n) for n in given)}) only apply when training")
        return
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    if args.launcher != "slurm":
        given = [n for n in vars(args) if n.startswith("slurm_") and getattr(args, n) != parser.get_default(n)]
        if given or args.wait:
            flags = [_flag(n) for n in given] + (["--wait"] if args.wait else [])
            parser.error(f"{', '.join(flags)} need --launcher slurm")
    elif args.parallel != 1 or args.gpus:
        parser.error("--parallel and --gpus are for --launcher local; SLURM runs as many jobs as "
                     "--slurm.array-parallelism allows")
    if args.slurm_gpus_per_job < 1:
        parser.error(f"--slurm.gpus-per-job must be >= 1, got {args.slurm_gpus_per_job}")


def _flag(dest: str) -> str:
    if dest.startswith("slurm_"):
        return f"--slurm.{dest[len('slurm_'):].replace('_', '-')}"
    return f"--{dest.replace('_', '-')}"


def launcher_from_args(args: argparse.Namespace, log: Log = print) -> Any:
    """The launcher the parsed options describe (see add_arguments)."""
    if args.launcher == "local":
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        return LocalLauncher(args.parallel, gpus, args.max_restarts, log)
    options = SlurmOptions(
        partition=args.slurm_partition, gpus_per_job=args.slurm_gpus_per_job, time_min=args.slurm_time,
        array_parallelism=args.slurm_array_parallelism, cpus_per_task=args.slurm_cpus_per_task,
        mem_gb=args.slurm_mem, account=args.slurm_account, qos=args.slurm_qos, constraint=args.slurm_constraint,
        exclude=args.slurm_exclude, signal_delay_s=args.slurm_signal_delay, max_timeouts=args.slurm_max_timeouts,
        setup=tuple(args.slurm_setup), job_name=args.slurm_job_name, executor=args.slurm_executor,
    )
    return SlurmLauncher(options, wait=args.wait, max_restarts=args.max_restarts, log=log)
