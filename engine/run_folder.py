"""A run folder on disk: its lock, its per-epoch records and its summary.

<results_loc>/<run_label>/ holds config.yaml, metrics.jsonl (one JSON object per finished
epoch), train.log, summary.json, checkpoint_last.pt, checkpoint_best.pt and, with EMA,
checkpoint_ema_best.pt. Only rank 0 of a run writes here, and only while it holds the lock.

The records never disagree with the checkpoint: an epoch's row is appended only after
checkpoint_last.pt of that epoch (which carries every row so far) is safely on disk, and a
resume first rewrites metrics.jsonl from that checkpoint. So after any sequence of kills and resumes the file
holds each epoch exactly once. summary.json exists from the start and says what state the run
is in after every stop. The read functions are what engine/experiments.py (which works out a
run's state from them) and the tools use.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Any, Dict, List, Optional

from utils.files import (DiskFullError, append_whole, atomic_write_text, is_disk_full, read_json_object, remove_quietly,
                         remove_stale_temp_files, write_json)

METRICS, SUMMARY, LOCK = "metrics.jsonl", "summary.json", ".lock"
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINTS = ("checkpoint_best.pt", "checkpoint_ema_best.pt")
RESTART = "restart"  # common.resume value: discard the folder's earlier run and train from scratch


class RunFolderBusy(Exception):
    """Another live trainer holds the run folder."""


# ----------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive POSIX record lock (fcntl) on `<run_dir>/.lock`, which the kernel drops the
    moment the holder dies, so a killed run never blocks its own resume. Unlike flock, forked
    children (DataLoader workers) do not inherit it, so orphaned workers cannot keep holding it.
    The file records the holder. (Such a lock is also dropped when its process closes any other
    descriptor of the file: only the holder's own RunLock opens it in a trainer process.)"""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        run_dir = os.path.dirname(self.path)
        try:
            os.makedirs(run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(self.path, None) from None
            # A read-only file system, a results-loc that is a file, no permission: the fix is
            # another place for the run, so it is bad input.
            raise ValueError(f"cannot create the run folder {run_dir} ({e.strerror or e}); set --common.results-loc "
                             "to a writable folder") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = read_lock_holder(os.path.dirname(self.path))
            who = f"process {holder['pid']} on {holder['host']}" if holder else "another process"
            raise RunFolderBusy(
                f"{os.path.dirname(self.path)} is in use by {who}, which is training this run; wait for it "
                "to end (or stop it), or start another run with --common.run-label NAME"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        except OSError as e:
            os.close(fd)
            if is_disk_full(e):
                raise DiskFullError(self.path, None) from None
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def read_lock_holder(run_dir: str) -> Optional[Dict[str, Any]]:
    """{pid, host, since} of the last process that locked the folder (held or not)."""
    return read_json_object(os.path.join(run_dir, LOCK)) or None


def is_locked(run_dir: str) -> bool:
    """Whether a live process holds the run folder's lock right now."""
    path = os.path.join(run_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock: free unless a trainer holds it
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# ----------------------------------------------------------------------------- metrics
def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The per-epoch rows of metrics.jsonl ([] when missing). A line cut short by a kill (the
    file is appended to) is skipped."""
    path = os.path.join(run_dir, METRICS)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        return []
    return rows


def best_epoch(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The row with the highest val_top1 (the earliest on ties), whatever stats.checkpoint_metric
    picked checkpoint_best.pt by; None without any. The tools' tables report this row."""
    best = None
    for row in rows:
        if row.get("val_top1") is not None and (best is None or row["val_top1"] > best["val_top1"]):
            best = row
    return best


def append_metrics(run_dir: str, row: Dict[str, Any]) -> None:
    """Append one epoch's row (synced: the row is on disk when this returns). A full disk is a
    DiskFullError with the file cut back to its earlier rows, not a torn last line."""
    append_whole(os.path.join(run_dir, METRICS), (json.dumps(row) + "\n").encode("utf-8"), sync=True)


def write_metrics(run_dir: str, rows: List[Dict[str, Any]]) -> bool:
    """Make metrics.jsonl hold exactly `rows` (the checkpoint's history), rewriting it atomically
    only when it differs: rows of epochs the checkpoint never saw, duplicates and a line cut
    short by a kill all go. Returns whether the file changed."""
    path = os.path.join(run_dir, METRICS)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        if not rows:
            return False
    atomic_write_text(path, text)
    return True


# ----------------------------------------------------------------------------- summary
def read_summary(run_dir: str) -> Dict[str, Any]:
    """summary.json as a dict ({} when missing or unreadable)."""
    return read_json_object(os.path.join(run_dir, SUMMARY))


def write_summary(run_dir: str, summary: Dict[str, Any]) -> None:
    write_json(os.path.join(run_dir, SUMMARY), {**summary, "updated": time.time()})


# ----------------------------------------------------------------------------- the open folder
def error_line(error: BaseException) -> str:
    """What summary.json and the launch records keep of an error: its message's first line (its
    type when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RunLog(logging.Handler):
    """train.log, one whole line per record. A full disk costs lines, with one warning on stderr
    instead of logging's report per line; the next metrics row or checkpoint stops the run."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._full = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            append_whole(self.path, (self.format(record) + "\n").encode("utf-8"))
            self._full = False
        except DiskFullError:
            if not self._full:
                self._full = True
                print(f"warning: disk full: {self.path} misses log lines until there is space", file=sys.stderr,
                      flush=True)
        except Exception:
            self.handleError(record)


class RunFolder:
    """The run folder as the trainer holds it: locked, with train.log attached to the logger.

    open() takes the lock before anything in the folder is read or written, removes the
    temporary files of writers that were killed, and decides which checkpoint (if any) to
    continue from. Only the main rank opens it; the others get a read-only handle.
    """

    def __init__(self, run_dir: str, writer: bool = True) -> None:
        self.path = run_dir
        self.writer = writer
        self._lock = RunLock(run_dir)
        self._handler: Optional[logging.Handler] = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def last_checkpoint(self) -> str:
        return self.file(LAST_CHECKPOINT)

    def open(self, logger: logging.Logger) -> "RunFolder":
        if not self.writer:
            return self
        self._lock.acquire()
        try:
            remove_stale_temp_files(self.path)
            handler = RunLog(self.file("train.log"))
            logger.addHandler(handler)
            self._handler = handler
        except BaseException:
            self._lock.release()
            raise
        return self

    def record_failure(self, message: str, max_epochs: int) -> None:
        """Put an error that ended the run (outside the training loop, which records its own) into
        train.log, and into summary.json when the folder has none yet: a folder whose earlier run
        was stopped keeps saying so (a refused resume does not fail that run)."""
        if not self.writer or self._handler is None:
            return
        record = logging.LogRecord("cvnets", logging.ERROR, __file__, 0, "error: %s", (message,), None)
        self._handler.handle(record)
        if not os.path.isfile(self.file(SUMMARY)):
            write_summary(self.path, {"state": "failed", "finished": False, "epochs_done": 0, "max_epochs": max_epochs,
                                      "error": message, "run_dir": os.path.abspath(self.path), "pid": os.getpid()})

    def close(self, logger: logging.Logger) -> None:
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        self._lock.release()


def resume_path(run_dir: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint a run continues from (None: a fresh start), per common.resume.

    Without common.resume, an existing checkpoint_last.pt is never overwritten; and a folder
    holding records of a run (metrics.jsonl rows, best checkpoints) but no checkpoint_last.pt
    is never silently retrained, with or without `auto`: both are a ValueError telling the
    user how to continue, start another run, or (`restart`) discard the records on purpose."""
    for folder, key in ((os.path.dirname(run_dir) or ".", "--common.results-loc"), (run_dir, "--common.run-label")):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{folder} is a file, not a folder for runs; change {key}")
    last = os.path.join(run_dir, LAST_CHECKPOINT)
    if resume == RESTART:
        return None
    if resume not in ("auto", None):
        return resume
    if os.path.isfile(last):
        if resume == "auto":
            return last
        raise ValueError(f"{run_dir} already holds a run; continue it with --common.resume auto, start another "
                         f"with --common.run-label NAME, or discard it with --common.resume {RESTART}")
    records = existing_records(run_dir)
    if records:
        raise ValueError(f"{run_dir} holds records of a run ({', '.join(records)}) but no {LAST_CHECKPOINT} to "
                         f"continue from; start another run with --common.run-label NAME, or discard these "
                         f"records and train from scratch with --common.resume {RESTART}")
    return None


def existing_records(run_dir: str) -> List[str]:
    """What a run left in `run_dir` that a fresh start would overwrite (besides checkpoint_last.pt)."""
    found = []
    rows = len(read_metrics(run_dir))
    if rows:
        found.append(f"{METRICS} with {rows} epoch(s)")
    found += [name for name in BEST_CHECKPOINTS if os.path.isfile(os.path.join(run_dir, name))]
    return found


def discard_records(run_dir: str) -> None:
    """Remove an earlier run's records and checkpoints (common.resume: restart)."""
    for name in (METRICS, LAST_CHECKPOINT) + BEST_CHECKPOINTS:
        remove_quietly(os.path.join(run_dir, name))
    shutil.rmtree(os.path.join(run_dir, "tensorboard"), ignore_errors=True)
