"""Deploy's children: started without forking the launcher (gRPC's fork handlers never run), and stopped by the
kernel when the launcher dies without cleaning up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from engines.deploy import Child
from engines.orphan_guard import EXIT_LAUNCHER_GONE
from tests.engines.procs import REPO_ROOT


def gone(pid: int) -> bool:
    """Exited (a zombie awaiting its reaper counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def test_launching_a_child_never_forks_this_process(tmp_path):
    """A fork() here runs gRPC's pthread_atfork handlers, which restart its pollers in the child; with the
    health-check channels open that child could abort before exec (seen in CI: prefill exited -6 in
    ev_epoll1_linux.cc). Python's own at-fork callbacks run exactly when such a fork happens."""
    forks = []
    os.register_at_fork(before=lambda: forks.append(os.getpid()))
    child = Child("echo", [sys.executable, "-c", "print('ran', flush=True)"], lambda: True, tmp_path / "echo.log").launch()
    assert child.proc.wait(30) == 0
    assert (tmp_path / "echo.log").read_text().strip() == "ran"
    assert forks == []


def test_a_child_is_stopped_when_its_launcher_is_killed(tmp_path):
    launcher_code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from engines.deploy import Child
        child = Child("sleeper", ["sleep", "120"], lambda: True, Path({str(tmp_path / 'sleeper.log')!r})).launch()
        print('pid', child.proc.pid, flush=True)
        time.sleep(120)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        pid = int(next(line for line in launcher.stdout if line.startswith("pid ")).split()[1])
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":  # the guard has exec'd the command
            assert time.monotonic() < deadline, "the guard never exec'd its command"
            time.sleep(0.05)
        assert not gone(pid)
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while not gone(pid):
            assert time.monotonic() < deadline, "the child outlived its SIGKILLed launcher"
            time.sleep(0.05)
    finally:
        launcher.kill()
        launcher.wait(10)


def test_the_guard_runs_nothing_when_its_launcher_is_already_gone(tmp_path):
    marker = tmp_path / "ran"
    result = subprocess.run([sys.executable, "-m", "engines.orphan_guard", "1", "touch", str(marker)], cwd=REPO_ROOT, timeout=30)
    assert result.returncode == EXIT_LAUNCHER_GONE
    assert not marker.exists()
