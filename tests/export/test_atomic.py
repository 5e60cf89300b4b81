"""An export killed with SIGKILL midway leaves the older output intact and no stray file."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import SMOLLM2
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from layerwise.util.files import atomic_folder, atomic_path, remove_stale_temporaries


def _unnamed_file_size(pid: int, directory) -> int | None:
    """Size of the file process `pid` is writing in `directory` without a name, if any."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(directory)) and target.endswith("(deleted)"):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_sigkill_midway_through_an_export_keeps_the_old_file(tmp_path):
    plan = Plan(QuantConfig("q8_0")).save(tmp_path / "plan.json")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an older export")
    export = subprocess.Popen([sys.executable, "-m", "layerwise", "export", str(SMOLLM2), "--plan", str(plan),
                               "--out", str(out), "--overwrite", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.monotonic() + 300
    while export.poll() is None and time.monotonic() < deadline:
        size = _unnamed_file_size(export.pid, tmp_path)
        if size is not None and size > 20_000_000:  # well into the tensor data (the file is ~145 MB)
            export.send_signal(signal.SIGKILL)
            killed_at = size
            break
        time.sleep(0.002)
    export.wait(timeout=60)
    assert killed_at is not None, f"the export ended (rc {export.returncode}) before it could be killed midway"
    assert export.returncode == -signal.SIGKILL
    assert out.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "plan.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["result.json"]


def test_folders_left_by_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".model.{int(dead.stdout)}-0badc0de.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".model.{os.getpid()}-12345678.tmp"  # a live writer's: kept
    mine.mkdir()
    assert remove_stale_temporaries(tmp_path / "model") == [leftover]
    with atomic_folder(tmp_path / "model") as scratch:
        (scratch / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "model"]
