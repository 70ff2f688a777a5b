"""Safe file writes shared by every package: a file is either its old self or its new self.

Every writer goes through a temporary file in the destination folder (a unique name, so two
writers never share one), flushed and fsynced before an atomic rename; on any failure the
temporary file is removed and the destination is left as it was. A full disk raises
DiskFullError, which names the folder and the bytes the write needed.

data/, engine/ and the tools all write files, so this module imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import tempfile
from typing import IO, Any, Callable, Dict, Iterator, Optional

TEMP_SUFFIX = ".tmp"


class DiskFullError(Exception):
    """The disk (or quota) ran out while writing `path`; nothing was changed at `path`."""

    def __init__(self, path: str, needed: Optional[int], free: Optional[int] = None) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        if free is None:
            free = free_bytes(folder)
        need = f"needs {needed:,} bytes" if needed is not None else "ran out of space"
        have = f", {free:,} free" if free is not None else ""
        super().__init__(f"disk full: writing {os.path.basename(path)} in {folder} {need}{have}; "
                         "free some space (or point the output elsewhere) and run the same command again")
        self.path, self.needed, self.free = path, needed, free


def free_bytes(folder: str) -> Optional[int]:
    """Bytes free for this user in `folder` (None when it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def temp_path_for(path: str) -> str:
    """A new, unique temporary file beside `path` (created empty): `.<name>.<pid>.<random>.tmp`.

    mkstemp creates it private (0600); it gets the mode open() would have given a new file
    under the umask (0644 under umask 022), so that a renamed-into-place run folder stays
    readable by the colleagues the umask allows."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return tmp


def temp_dir_for(path: str, tag: str) -> str:
    """A new, unique folder beside `path` (`.<name>.<tag>-<random>`) to build a tree in and rename
    into place; with the mode a new folder gets under the umask, not mkdtemp's private 0700."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{name}.{tag}-", dir=folder)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it to read
    it back would briefly apply to files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_in_the_way(path: str) -> Optional[str]:
    """The nearest existing ancestor folder of `path` when it is a file (so that `path` can never
    be written), else None."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # folders that atomic_open would create
        folder = os.path.dirname(folder)
    return None if os.path.isdir(folder) else folder


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", expected_size: Optional[int] = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces `path` atomically.

    `expected_size`, when known, is checked against the free space first and named in the
    DiskFullError of a write that runs out of space.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes files; mode {mode!r} has no 'w'")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if expected_size is not None:
        free = free_bytes(folder)
        if free is not None and free < expected_size:
            raise DiskFullError(path, expected_size, free)
    try:
        tmp = temp_path_for(path)
    except OSError as e:  # no inode left for the temporary file
        if is_disk_full(e):
            raise DiskFullError(path, expected_size) from None
        raise
    try:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding, newline=None if "b" in mode else "") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _test_fault(path)
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        if is_disk_full(e):
            raise DiskFullError(path, expected_size) from None
        raise
    _fsync_folder(folder)


# Test-only fault injection, so that the fault tests hit the moment they claim to instead of racing
# the writer: CVNETS_TEST_FAULT="SIGNAL:GLOB:N[:ONCE_FILE]" makes the N-th write of this process
# whose destination path matches GLOB send SIGNAL (SIGKILL, SIGTERM, ...) to its own process once
# the temporary file is complete, just before the rename. With ONCE_FILE, only the process that
# deletes that file first does, so a run relaunched with the same environment does not repeat it.
TEST_FAULT_ENV = "CVNETS_TEST_FAULT"
_test_fault_writes = 0


def _test_fault(path: str) -> None:
    global _test_fault_writes
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return
    try:
        name, pattern, nth, *once = spec.split(":", 3)
        sig, nth = signal.Signals[name], int(nth)
    except (KeyError, ValueError):
        raise ValueError(f"{TEST_FAULT_ENV}={spec!r}: expected SIGNAL:GLOB:N[:ONCE_FILE], e.g. "
                         "SIGKILL:*/checkpoint_last.pt:2") from None
    if not fnmatch.fnmatch(os.path.abspath(path), pattern):
        return
    _test_fault_writes += 1
    if _test_fault_writes != nth:
        return
    if once:
        try:
            os.remove(once[0])
        except FileNotFoundError:
            return
    os.kill(os.getpid(), sig)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb", expected_size=len(data)) as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_whole(path: str, data: bytes, sync: bool = False) -> None:
    """Append `data` to `path` (created if absent) entirely or not at all: a full disk is a
    DiskFullError with the file cut back to its earlier length, not a torn last line. `sync`:
    on the disk when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            if sync:
                os.fsync(fd)
        except OSError as e:
            if not is_disk_full(e):
                raise
            os.ftruncate(fd, size)
            raise DiskFullError(path, len(data)) from None
    finally:
        os.close(fd)


def read_json_object(path: str) -> Dict[str, Any]:
    """The JSON object in `path`; {} when the file is missing, unreadable or holds something else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: str, data: Any) -> None:
    """`data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def waiting_lock(path: str, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold an exclusive POSIX lock on the file `path` for the body; when another process holds
    it, call on_wait() once and wait for it. The kernel drops the lock of a process that dies, so
    a killed holder never blocks the next one. The holder removes the file before releasing it
    (no lock file is left behind); a waiter that then finds its file gone locks a new one. Where
    the file cannot be created (a read-only folder) the body runs unlocked: it cannot write there
    either, and says so in its own words."""
    waited = False
    while True:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # read-only, not a folder, full: the body meets (and reports) it too
            yield
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            if not waited:
                on_wait()
                waited = True
            fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # still the file at `path`: the lock is ours
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed it: lock the new one
    try:
        yield
    finally:
        remove_quietly(path)  # while still locked, so that nobody can lock it in between
        os.close(fd)


def writer_pid(name: str) -> Optional[int]:
    """The process id in a temporary file's name: this module's `.<name>.<pid>.<random>.tmp`,
    or version 0.1's `<name>.tmp-<pid>` (a killed 0.1 cache build left one of up to 1.2 GB)."""
    parts = name.split(".")
    if name.startswith(".") and name.endswith(TEMP_SUFFIX) and len(parts) >= 5:
        pid = parts[-3]  # ["", name..., pid, random, "tmp"]
    else:
        pid = name.rpartition(".tmp-")[2] if ".tmp-" in name else ""
    return int(pid) if pid.isdigit() else None


def remove_stale_temp_files(folder: str) -> int:
    """Delete the temporary files of this module's naming (or 0.1's) in `folder` whose writer
    process is gone (the leftovers of writers that were killed); the number removed."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        pid = writer_pid(entry.name)
        if pid is not None and entry.is_file() and not _alive(pid):
            remove_quietly(entry.path)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)
