"""How runs are started: one after another, N at once, under torchrun, or as SLURM jobs.

- LocalLauncher(parallel=1): one run after another, its output on the terminal (the default).
- LocalLauncher(parallel=N): N runs at once, each on its own GPU (CUDA_VISIBLE_DEVICES) when
  the machine has GPUs, otherwise N CPU processes sharing the cores.
- LocalLauncher(nproc_per_run=G), SlurmOptions(gpus_per_job=G): G > 1 trains each run with DDP
  through `python -m torch.distributed.run` (torchrun).
- SlurmLauncher: one job per run, submitted as a job array through submitit.

A launcher takes a list of engine.experiments.RunSpec (engine.experiments.launch hands it the
pending ones). Every run is a separate process, `python main_train.py ARGS`, that continues its
run folder (`--common.resume auto`). The run folder's lock (engine/run_folder.py) makes sure that
no two trainers ever share a folder; the launchers never start a run whose lock is held and never
touch a lock themselves.

Stops. main_train saves and exits 128 + N on SIGINT, SIGTERM or SIGUSR1. RestartPolicy decides,
for the local launcher and inside a SLURM job alike, that a run stopped by SIGTERM or SIGUSR1 (or
killed) while its launcher was not told to stop is resumed at once, up to max_restarts times.
Ctrl-C or SIGTERM to the local launcher is passed on to its runs once (they run in their own
sessions, so a terminal's Ctrl-C reaches them only this way); they save and the launcher exits
128 + N. Under SLURM the job gets SIGUSR1 `signal_delay_s` seconds before its time limit
(submitit's `--signal`, set to USR1 here because that is the signal the trainer saves on), the
trainer saves, submitit's checkpoint() hook requeues the job, and the requeued job resumes the
run. A preemption's SIGTERM reaches every process of the job: the trainer saves and SLURM
requeues the job (`--requeue`). A local launcher that is killed outright (SIGKILL) leaves its
runs going; a later launch finds them holding their locks and skips them. submitit's job files
go to `<results>/_launch/submitit/`.

add_launch_arguments, check_launch_arguments and launcher_from_args are the launcher options of
the tools that train runs; the SLURM options are the fields of SlurmOptions.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import difflib
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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from engine.experiments import Log, RunSpec, log_path, read_record, run_state, update_record
from engine.run_folder import error_line, is_locked
from engine.signals import STOP_SIGNALS, handling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_TRAIN = os.path.join(REPO, "main_train.py")
CLUSTER_HINT = "the slurm launcher needs submitit: pip install -e '.[cluster]'"
PREEMPT_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # which signal submitit's job process treats as "checkpoint, requeue"
RESUMABLE = (128 + signal.SIGTERM, 128 + signal.SIGUSR1)  # saved after a stop from outside, not a user's Ctrl-C


class LaunchError(Exception):
    """A launcher cannot start (missing submitit, no SLURM here, a refused submission); one line."""


class RunFailed(Exception):
    """A run ended without finishing (raised inside a SLURM job, so that submitit records it)."""


# ----------------------------------------------------------------------------- trainer processes
def train_command(spec: RunSpec, nproc: int = 1) -> List[str]:
    """The command that trains `spec`: main_train.py, under torchrun-style DDP for nproc > 1."""
    if nproc > 1:
        return [sys.executable, "-m", "engine.torchrun", "--standalone", f"--nproc_per_node={nproc}",
                MAIN_TRAIN, *spec.args]
    return [sys.executable, MAIN_TRAIN, *spec.args]


def describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal_name(-code)}"
    if code - 128 in STOP_SIGNALS:
        return f"stopped by {signal_name(code - 128)}, state saved"
    return f"exit status {code}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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


def torchrun_env(env: Dict[str, str], under_slurm: bool) -> Tuple[Dict[str, str], Tuple[int, ...]]:
    """The environment and the signals to ignore for a torchrun of several trainers.

    Under SLURM every worker gets the signal from SLURM itself; torchrun passing it on as well
    would make it a second one, which stops a trainer at once instead of after its save. Elsewhere
    torchrun is the one process signalled and passes the stop signals on to its workers."""
    if under_slurm:
        return {**env, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT"}, STOP_SIGNALS
    return {**env, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}, ()


@dataclass(frozen=True)
class RestartPolicy:
    """A run's attempts, for every launcher (a local slot, a SLURM job): an attempt stopped from
    outside (SIGTERM, SIGUSR1, killed) while its launcher was not told to stop is started again
    at once, at most `max_restarts` times. A failure or a user's Ctrl-C is recorded and left."""

    max_restarts: int = 3

    def after(self, spec: RunSpec, proc: TrainerProcess, restarts: int, told_to_stop: bool, log: Log) -> bool:
        """Record how the attempt ended; True when the run is to be started again now."""
        code = proc.returncode
        assert code is not None, "the attempt has not ended"
        if code == 0:
            update_record(spec, state="finished", exit_code=0, ended=time.time())
            return False
        if (code in RESUMABLE or code < 0) and not told_to_stop and restarts < self.max_restarts:
            log(f"{spec.title}: {describe_exit(code)}; resuming (restart {restarts + 1} of {self.max_restarts})")
            update_record(spec, state="restarted", exit_code=code, restarts=restarts + 1)
            return True
        stopped = code - 128 in STOP_SIGNALS or code < 0
        last = proc.last_line()
        ending = describe_exit(code) + (f": {last}" if last and not stopped else "")
        update_record(spec, state="interrupted" if stopped else "failed", exit_code=code, error=ending,
                      ended=time.time())
        log(f"{spec.title}: {ending}")
        return False

    def run(self, spec: RunSpec, start: Callable[[int], TrainerProcess], told_to_stop: Callable[[], bool],
            log: Log) -> TrainerProcess:
        """Train `spec` to its end: start(restarts) an attempt and wait for it, again for as long as
        after() says so; the last attempt."""
        restarts = 0
        while True:
            proc = start(restarts)
            proc.wait()
            if not self.after(spec, proc, restarts, told_to_stop(), log):
                return proc
            restarts += 1


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


class LocalLauncher:
    """Runs on this machine, `parallel` at a time, each in its own process (and session), each
    with `nproc_per_run` trainers (DDP through torchrun when > 1). A thread per slot trains the
    queued runs one after another; the main thread only passes signals on."""

    def __init__(self, parallel: int = 1, gpus: Optional[Sequence[str]] = None,
                 policy: RestartPolicy = RestartPolicy(), log: Log = print, nproc_per_run: int = 1) -> None:
        if parallel < 1 or nproc_per_run < 1:
            raise ValueError(f"parallel and nproc_per_run must be >= 1, got {parallel} and {nproc_per_run}")
        self.parallel, self.nproc = parallel, nproc_per_run
        self.gpus = list(visible_gpus() if gpus is None else gpus)
        self.policy = policy
        self.log = log
        self._signal: Optional[int] = None
        self._running: Dict[int, TrainerProcess] = {}  # slot -> the attempt it runs now
        self._starting = threading.Lock()  # a signal reaches an attempt started while it arrives

    def launch(self, runs: Sequence[RunSpec]) -> int:
        """Train every run; returns 0 when all finished, 1 when one did not, 128 + N when the
        launcher itself was stopped by signal N (its runs saved first)."""
        queue = deque(runs)
        at_once = min(self.parallel, len(runs))
        if at_once > 1 and self.gpus and at_once * self.nproc > len(self.gpus):
            self.log(f"note: {at_once} runs of {self.nproc} trainer(s) at once share {len(self.gpus)} GPU(s)")
        failed: List[RunSpec] = []
        errors: List[BaseException] = []  # raised in a slot: raised again here

        def train_in_slot(slot: int) -> None:
            try:
                while self._signal is None and not errors:
                    try:
                        spec = queue.popleft()  # atomic: the slots share the queue
                    except IndexError:
                        return
                    proc = self.policy.run(spec, lambda restarts: self._start(spec, slot, restarts + 1),
                                           lambda: self._signal is not None, self.log)
                    if proc.returncode != 0:
                        failed.append(spec)
                    elif self.parallel > 1:
                        self.log(f"{spec.title}: finished")
            except BaseException as e:
                errors.append(e)

        slots = [threading.Thread(target=train_in_slot, args=(slot,), daemon=True) for slot in range(at_once)]
        with self._passing_on_signals():
            for thread in slots:
                thread.start()
            announced = False
            while any(thread.is_alive() for thread in slots) and not errors:
                time.sleep(0.1)  # the signal handler runs in this thread, between these sleeps
                if self._signal is not None and not announced:  # printed here, not in the handler
                    announced = True
                    self.log(f"{signal_name(self._signal)}: passed on to the running runs, which save and stop")
        if errors:
            raise errors[0]
        if self._signal is not None:
            return 128 + self._signal
        return 1 if failed or queue else 0

    def _env(self, slot: int) -> Optional[Dict[str, str]]:
        if self.parallel == 1 and self.nproc == 1:
            return None  # the run sees what this shell sees
        env = dict(os.environ)
        if self.gpus and self.parallel > 1:
            first = slot * self.nproc
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[(first + i) % len(self.gpus)] for i in range(self.nproc))
        elif not self.gpus and "OMP_NUM_THREADS" not in env:
            share = (os.cpu_count() or 1) // (self.parallel * self.nproc)
            env["OMP_NUM_THREADS"] = str(max(1, share))  # no oversubscription
        if self.nproc > 1:
            env = torchrun_env(env, under_slurm=False)[0]
        return env

    def _start(self, spec: RunSpec, slot: int, attempt: int) -> TrainerProcess:
        env = self._env(slot)
        with self._starting:
            proc = self._running[slot] = TrainerProcess(spec, train_command(spec, self.nproc), env=env,
                                                        echo=self.parallel == 1)
            if self._signal is not None:  # arrived after the policy's last look: this attempt saves and stops
                proc.send_signal(self._signal)
        if self.parallel == 1:
            self.log(f"{spec.title}: training")
        else:
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env and self.gpus else ""
            shown = os.path.relpath(proc.log)
            self.log(f"{spec.title}: started{where}, output in {proc.log if shown.startswith('..') else shown}")
        update_record(spec, launcher="local", pid=proc.pid, host=socket.gethostname(), state="running",
                      attempt=attempt, started=time.time(), log=proc.log, job_id=None, group=spec.group,
                      label=spec.label)
        return proc

    @contextlib.contextmanager
    def _passing_on_signals(self) -> Iterator[None]:
        """A stop signal here (Ctrl-C, SIGTERM, SIGUSR1, SIGHUP): start nothing more and pass it on,
        once per arrival, to the runs (which save and stop; a second Ctrl-C stops them at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            with self._starting:  # held by a slot thread only, never by this (the main) one
                if self._signal is None:
                    self._signal = signum
                for proc in self._running.values():
                    proc.send_signal(signum)

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
        raise ValueError(f"{text!r} is not a SLURM time (e.g. 240, 4:00:00 or 1-00:00:00)")
    days, a, b, c = (int(g) if g else 0 for g in match.groups())
    if match.group(1):  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + a) * 60 + b) * 60 + c
    elif match.group(4):  # HH:MM:SS
        seconds = (a * 60 + b) * 60 + c
    else:  # MM[:SS]
        seconds = a * 60 + b
    if seconds < 60:
        raise ValueError(f"{text!r} is under a minute")
    return math.ceil(seconds / 60)


def parse_mem_gb(text: str) -> float:
    """Memory per job as sbatch writes it (32G, 500M, 1T) in GB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT])B?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a memory size with a unit (e.g. 32G or 500M)")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[match.group(2).upper()]
    return float(match.group(1)) * scale


def _option(default: Any, help: str = "", metavar: Optional[str] = None, flag: Optional[str] = None,
            parse: Optional[Callable[[str], Any]] = None, choices: Optional[Sequence[str]] = None) -> Any:
    """A SlurmOptions field and its command-line option `--slurm.<flag>` (default: the field's name)."""
    return field(default=default, metadata=dict(help=help, metavar=metavar, flag=flag, parse=parse, choices=choices))


@dataclass(frozen=True)
class SlurmOptions:
    """The job settings, one job per run, all runs of a launch in one job array; each field is
    also the command-line option --slurm.<name> (add_launch_arguments)."""

    partition: Optional[str] = _option(None, metavar="NAME")
    gpus_per_job: int = _option(1, "GPUs per run on one node; G > 1 trains with DDP (torchrun) inside the job",
                                "G", parse=int)
    time_min: int = _option(240, "time limit per job in minutes, or e.g. 4:00:00; a run that needs longer is "
                            "requeued and resumed", "TIME", flag="time", parse=parse_minutes)
    array_parallelism: Optional[int] = _option(None, "jobs running at once (default: as many as the cluster allows)",
                                               "N", parse=int)
    cpus_per_task: Optional[int] = _option(None, "CPUs per job (DataLoader workers + 1 per GPU; default: the "
                                           "cluster's)", "N", parse=int)
    mem_gb: Optional[float] = _option(None, "memory per job, e.g. 32G", "SIZE", flag="mem", parse=parse_mem_gb)
    account: Optional[str] = _option(None, metavar="NAME")
    qos: Optional[str] = _option(None, metavar="NAME")
    constraint: Optional[str] = _option(None, metavar="FEATURES")
    exclude: Optional[str] = _option(None, metavar="NODES")
    # SIGUSR1 this long before the time limit: the save and the requeue fit in it.
    signal_delay_s: int = _option(120, "SIGUSR1 this many seconds before the time limit; the trainer saves", "S",
                                  flag="signal-delay", parse=int)
    max_timeouts: int = _option(10, "requeues after reaching the time limit; preemptions do not count", "N",
                                parse=int)
    setup: Tuple[str, ...] = _option((), "shell line run in the job first, e.g. 'source .venv/bin/activate' "
                                     "(repeatable)", "LINE")
    job_name: str = _option("cvnets", metavar="NAME")
    executor: str = _option("slurm", "local: run the same submitit jobs as processes on this machine (the cluster "
                            "code path: job files, USR1, requeue) without a cluster", choices=("slurm", "local"))

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
                 policy: RestartPolicy = RestartPolicy()) -> None:
        self.spec, self.nproc, self.cwd = spec, nproc, cwd
        self.grace_s, self.policy = grace_s, policy
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
                      slurm_restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0")), group=spec.group,
                      label=spec.label)
        with handling((signal.SIGINT, signal.SIGTERM), self._on_stop):
            proc = self.policy.run(spec, self._start, lambda: self._stopped_by is not None,
                                   lambda line: print(line, flush=True))
        if proc.returncode != 0:
            raise RunFailed(f"{spec.title}: {read_record(spec).get('error')}")
        return "finished"

    def _start(self, restarts: int) -> TrainerProcess:
        """An attempt, once no trainer of this run holds its folder: one may still be saving (e.g.
        the job before a requeue, on another node); if it outlives the grace time the new trainer
        refuses with one line."""
        deadline = time.monotonic() + self.grace_s
        while is_locked(self.spec.run_dir) and time.monotonic() < deadline:
            time.sleep(1.0)
        env, ignore = dict(os.environ), ()
        if self.nproc > 1:
            env, ignore = torchrun_env(env, self._under_slurm())
        self._proc = TrainerProcess(self.spec, train_command(self.spec, self.nproc), env=env, echo=True,
                                    own_session=not self._under_slurm(), ignore=ignore, cwd=self.cwd)
        return self._proc

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._stopped_by = signum
        print(f"{self.spec.title}: {signal_name(signum)} received; the trainer saves and stops", flush=True)
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
        return DelayedSubmission(TrainJob(self.spec, self.nproc, self.cwd, self.grace_s, self.policy))


class SlurmLauncher:
    """Submits one job per run (a job array) through submitit; returns once they are queued,
    or with wait=True once they have all ended."""

    def __init__(self, options: SlurmOptions, wait: bool = False, policy: RestartPolicy = RestartPolicy(),
                 log: Log = print) -> None:
        self.options, self.wait, self.policy, self.log = options, wait, policy, log

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
        jobs = [TrainJob(spec, o.gpus_per_job, os.getcwd(), grace, self.policy) for spec in runs]
        try:
            with _preempt_signal_env(), executor.batch():
                submitted = [executor.submit(job) for job in jobs]
        except (OSError, FailedJobError, FailedSubmissionError) as e:
            raise LaunchError(f"submission failed: {error_line(e)}") from None
        kind = "SLURM" if o.executor == "slurm" else "local submitit"
        for spec, job in zip(runs, submitted):
            update_record(spec, launcher=o.executor if o.executor == "slurm" else "submitit-local", job_id=job.job_id,
                          submitit_folder=folder, state="queued", submitted=time.time(), pid=None, group=spec.group,
                          label=spec.label)
            self.log(f"{spec.title}: submitted as {kind} job {job.job_id}")
        if not self.wait:
            self.log(f"{len(submitted)} job(s) submitted; follow them with --status")
            return 0
        poll = 60.0 if o.executor == "slurm" else 1.0
        while not all(job.done() for job in submitted):
            time.sleep(poll)
        return 0 if all(run_state(spec).state == "finished" for spec in runs) else 1


# ----------------------------------------------------------------------------- command-line options
SLURM_DEST = "slurm_"  # argparse destinations of the SlurmOptions fields
LOCAL_OPTIONS = ("parallel", "gpus", "nproc_per_run")


def _slurm_flags() -> Dict[str, str]:
    """{SlurmOptions field: its option}, e.g. time_min: --slurm.time."""
    return {f.name: "--slurm." + (f.metadata["flag"] or f.name.replace("_", "-"))
            for f in dataclasses.fields(SlurmOptions)}


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher options of the tools that train runs (tools/sweep.py, tools/paper_tables.py)."""
    group = parser.add_argument_group("launching runs")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: on this machine (default); slurm: one job per run through submitit")
    group.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="local: N runs at once, one GPU each when there are GPUs (default 1: one after another)")
    group.add_argument("--gpus", metavar="IDS", help="local: GPU ids to spread runs over, e.g. 0,1 "
                       "(default: CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists)")
    group.add_argument("--nproc-per-run", type=int, default=1, metavar="G",
                       help="local: G trainers per run, DDP through torchrun (default 1)")
    default_restarts = RestartPolicy().max_restarts
    group.add_argument("--max-restarts", type=int, default=default_restarts, metavar="N",
                       help="resume a run stopped by SIGTERM/SIGUSR1 or killed up to N times "
                       f"(default {default_restarts})")
    slurm = parser.add_argument_group("SLURM (with --launcher slurm; needs pip install -e '.[cluster]')")
    flags = _slurm_flags()
    for f in dataclasses.fields(SlurmOptions):
        meta, repeated = f.metadata, isinstance(f.default, tuple)
        shown = f" (default {f.default})" if meta["help"] and f.default is not None and not repeated else ""
        kwargs: Dict[str, Any] = dict(dest=SLURM_DEST + f.name, default=None if repeated else f.default,
                                      metavar=meta["metavar"], help=(meta["help"] + shown) or None)
        if repeated:
            kwargs["action"] = "append"  # into a new list: a list default would be shared by every parse
        if meta["parse"] is not None:
            kwargs["type"] = _argument_type(meta["parse"])
        if meta["choices"] is not None:
            kwargs.update(choices=meta["choices"], metavar=None)
        slurm.add_argument(flags[f.name], **kwargs)
    slurm.add_argument("--wait", action="store_true", help="slurm: wait until every job has ended")


def check_launch_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: Sequence[str],
                           running: bool = True) -> None:
    """Refuse a misspelt --slurm.* option (it would otherwise pass for a config key), options that
    would be ignored: any launcher option when nothing is launched (`running` False), and the
    other launcher's options (parser.error: one line, exit status 2)."""
    flags = _slurm_flags()
    known = list(flags.values())
    for word in overrides:
        name = word.split("=", 1)[0]
        if name.startswith("--slurm."):
            close = difflib.get_close_matches(name, known, n=1)
            parser.error(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else
                                                      f"; the SLURM options are {', '.join(known)}"))
    by_dest = {SLURM_DEST + name: option for name, option in flags.items()}

    def flag(dest: str) -> str:
        return by_dest.get(dest, f"--{dest.replace('_', '-')}")

    slurm_given = [d for d in (SLURM_DEST + n for n in flags) if getattr(args, d) != parser.get_default(d)]
    if not running:
        given = [n for n in ("launcher", *LOCAL_OPTIONS, "max_restarts", "wait")
                 if getattr(args, n) != parser.get_default(n)] + slurm_given
        if given:
            parser.error(f"launcher options ({', '.join(flag(n) for n in given)}) only apply when training")
        return
    for name in ("parallel", "nproc_per_run", SLURM_DEST + "gpus_per_job"):
        if getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.launcher != "slurm":
        if slurm_given or args.wait:
            parser.error(f"{', '.join([flag(n) for n in slurm_given] + (['--wait'] if args.wait else []))} "
                         "need --launcher slurm")
    elif any(getattr(args, n) != parser.get_default(n) for n in LOCAL_OPTIONS):
        parser.error("--parallel, --gpus and --nproc-per-run are for --launcher local; SLURM runs as many jobs as "
                     "--slurm.array-parallelism allows, each with --slurm.gpus-per-job trainers")


def launcher_from_args(args: argparse.Namespace, log: Log = print) -> Any:
    """The launcher the parsed options describe (see add_launch_arguments)."""
    policy = RestartPolicy(args.max_restarts)
    if args.launcher == "local":
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        return LocalLauncher(args.parallel, gpus, policy, log, args.nproc_per_run)
    values = {f.name: getattr(args, SLURM_DEST + f.name) for f in dataclasses.fields(SlurmOptions)}
    options = SlurmOptions(**{**values, "setup": tuple(values["setup"] or ())})
    return SlurmLauncher(options, wait=args.wait, policy=policy, log=log)
