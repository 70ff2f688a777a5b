"""Atomic writes (utils/files.py): a file is its old self or its new self, and the test-only
fault hook that stops a writer at the one moment the fault tests need."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, child_env
from utils.files import TEST_FAULT_ENV, atomic_write_text, remove_stale_temp_files, writer_pid

# Three writes, the second and third to the same file; prints its pid first.
WRITER = textwrap.dedent("""
    import os, sys
    from utils.files import atomic_write_text
    folder = sys.argv[1]
    print(os.getpid(), flush=True)
    atomic_write_text(os.path.join(folder, "a.txt"), "first")
    atomic_write_text(os.path.join(folder, "b.txt"), "other")
    atomic_write_text(os.path.join(folder, "a.txt"), "second")
""")


def write_three(folder, fault):
    return subprocess.run([sys.executable, "-c", WRITER, str(folder)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=child_env(**{TEST_FAULT_ENV: fault}))


def temp_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(str(path), "old")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(str(path), "new")
    assert path.read_text() == "old" and temp_files(tmp_path) == []


@pytest.mark.slow
def test_the_fault_hook_kills_the_nth_matching_write_before_its_rename(tmp_path):
    done = write_three(tmp_path, "SIGKILL:*/a.txt:2")  # b.txt does not match, so does not count
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / "a.txt").read_text() == "first" and (tmp_path / "b.txt").read_text() == "other"
    (left,) = temp_files(tmp_path)
    assert (tmp_path / left).read_text() == "second"  # written in full, never renamed
    assert writer_pid(left) == int(done.stdout.split()[0])
    assert remove_stale_temp_files(str(tmp_path)) == 1 and temp_files(tmp_path) == []


@pytest.mark.slow
def test_a_fault_with_a_once_file_strikes_one_process_only(tmp_path):
    once = tmp_path / "once"
    once.touch()
    data = tmp_path / "data"
    data.mkdir()
    assert write_three(data, f"SIGKILL:*/a.txt:2:{once}").returncode == -signal.SIGKILL
    assert not once.exists()
    again = write_three(data, f"SIGKILL:*/a.txt:2:{once}")  # the relaunch runs to the end
    assert again.returncode == 0, again.stderr
    assert (data / "a.txt").read_text() == "second"


def test_a_malformed_fault_is_refused_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_FAULT_ENV, "KILL:a.txt")
    with pytest.raises(ValueError, match=f"{TEST_FAULT_ENV}='KILL:a.txt': expected SIGNAL:GLOB:N"):
        atomic_write_text(str(tmp_path / "a.txt"), "x")
    assert os.listdir(tmp_path) == []
