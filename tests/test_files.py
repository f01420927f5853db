"""recipes.files: atomic, flushed writes; staging left by killed processes; permissions; and the
recipes that write through it (checkpoints, result files, the corpus cache, downloads)."""

import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from helpers import FakeResponse
from recipes import data, files
from recipes.common import save_checkpoint
from recipes.data import prepare_corpus
from recipes.files import remove_abandoned, replace_durably, staging_path, write_atomic

pytestmark = pytest.mark.skipif(os.name != "posix", reason="flushes, modes and pids as on POSIX")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40, encoding="utf-8")
    return path


@pytest.fixture
def disk_log(monkeypatch):
    """What reaches the disk, in order: ("fsync", path) and ("replace", source, destination)."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return log


def _flushed_then_renamed(log, source, destination):
    """The rename of ``source`` over ``destination`` came after ``source`` was flushed, and the
    folder's entries were flushed after it."""
    source, destination = str(source), str(destination)
    moves = [i for i, entry in enumerate(log) if entry == ("replace", source, destination)]
    assert len(moves) == 1, log
    flushed_before = {entry[1] for entry in log[:moves[0]] if entry[0] == "fsync"}
    flushed_after = {entry[1] for entry in log[moves[0]:] if entry[0] == "fsync"}
    assert source in flushed_before, log
    assert os.path.dirname(destination) in flushed_after, log
    return flushed_before


def test_write_atomic_flushes_the_file_then_the_rename(tmp_path, disk_log):
    path = tmp_path / "result.json"
    write_atomic(path, '{"status": "finished"}')
    assert path.read_text() == '{"status": "finished"}'
    (_, source, _), = [e for e in disk_log if e[0] == "replace"]
    _flushed_then_renamed(disk_log, source, path)


def test_write_atomic_leaves_the_old_file_when_cut_short(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_atomic(path, "old")
    monkeypatch.setattr(files.os, "replace", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


class _OneProcessFabric:
    """What save_checkpoint uses of Fabric, for one process."""
    is_global_zero = True

    def save(self, path, state):
        torch.save(state, path)

    def barrier(self):
        pass


def test_checkpoints_are_flushed_before_they_replace_the_previous_one(tmp_path, disk_log):
    path = tmp_path / "best.pt"
    save_checkpoint(_OneProcessFabric(), path, {"step": 7})
    _flushed_then_renamed(disk_log, tmp_path / "best.pt.tmp", path)
    assert torch.load(path)["step"] == 7


def test_a_corpus_cache_entry_is_flushed_file_by_file_before_it_appears(tmp_path, text_file, disk_log):
    corpus = prepare_corpus("text", path=text_file, cache_dir=tmp_path / "cache")
    (_, staging, entry), = [e for e in disk_log if e[0] == "replace"]
    flushed = _flushed_then_renamed(disk_log, staging, entry)
    written = {"train.bin", "val.bin", "meta.json"}
    assert {os.path.join(staging, name) for name in written} <= flushed
    assert written <= set(os.listdir(entry)) and len(corpus.splits["train"]) > 0


def test_what_the_recipes_write_follows_the_umask(tmp_path, text_file):
    """mkstemp and mkdtemp create 0600 / 0700: result.json, config.yaml and cache entries were
    unreadable to the user's group even with a group-friendly umask."""
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "result.json", "{}")
        prepare_corpus("text", path=text_file, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o640
    entry, = (tmp_path / "cache").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o750
    assert {stat.S_IMODE(f.stat().st_mode) for f in entry.iterdir()} == {0o640}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _staging_of(path, pid, host=None):
    name = staging_path(path).name
    prefix = f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
    assert name.startswith(prefix)
    host = host or socket.gethostname()
    return path.with_name(f"{path.name}.tmp-{host}-{pid}-{name[len(prefix):]}")


def test_staging_left_by_a_killed_process_of_this_host_is_removed(tmp_path):
    target = tmp_path / "entry"
    dead = _staging_of(target, _dead_pid())
    alive = _staging_of(target, os.getpid())
    elsewhere = _staging_of(target, _dead_pid(), host="another-host")
    other_entry = _staging_of(tmp_path / "entry2", _dead_pid())
    for folder in (dead, alive, elsewhere, other_entry):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 64)
    users_own = tmp_path / f"entry.tmp-{socket.gethostname()}-{_dead_pid()}-notes"
    users_own.write_text("not a staging name: kept")

    remove_abandoned(tmp_path)
    assert not dead.exists() and not other_entry.exists()
    assert alive.is_dir() and elsewhere.is_dir() and users_own.is_file()
    half_file = _staging_of(tmp_path / "result.json", _dead_pid())
    half_file.write_text('{"sta')
    write_atomic(tmp_path / "result.json", "{}")
    assert not half_file.exists()


def test_staging_of_a_process_it_may_not_signal_is_kept(tmp_path, monkeypatch):
    # os.kill(pid, 0) refused (EPERM): another user's process holds that pid and runs, so its build stays
    staging = _staging_of(tmp_path / "entry", _dead_pid())
    staging.mkdir()

    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(files.os, "kill", kill)
    remove_abandoned(tmp_path)
    assert staging.is_dir()


def test_building_a_corpus_entry_removes_what_a_killed_build_left(tmp_path, text_file):
    prepare_corpus("text", path=text_file, cache_dir=tmp_path / "cache")
    entry, = (tmp_path / "cache").iterdir()
    dead = _staging_of(entry, _dead_pid())
    dead.mkdir()
    (dead / "train.bin").write_bytes(b"\0" * 64)
    text_file.write_text(text_file.read_text() + "More.\n")  # another entry is built
    prepare_corpus("text", path=text_file, cache_dir=tmp_path / "cache")
    assert not dead.exists()


def test_a_download_cut_short_by_a_kill_is_removed_by_the_next(tmp_path, monkeypatch):
    dest = tmp_path / "input.txt"
    part = _staging_of(dest, _dead_pid())
    part.write_bytes(b"half a download")
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"the text\n", 9))
    data.download("https://example.invalid/input.txt", dest, None)
    assert dest.read_bytes() == b"the text\n" and sorted(tmp_path.iterdir()) == [dest]


def test_replace_durably_moves_a_folder_into_place(tmp_path, disk_log):
    staging = tmp_path / "staged"
    staging.mkdir()
    (staging / "a.bin").write_bytes(b"1")
    replace_durably(staging, tmp_path / "entry")
    assert (tmp_path / "entry" / "a.bin").read_bytes() == b"1" and not staging.exists()
    assert str(staging / "a.bin") in _flushed_then_renamed(disk_log, staging, tmp_path / "entry")
