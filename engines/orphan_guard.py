"""Run a command that the kernel stops (SIGTERM) when the process that launched it dies.

    python -m engines.orphan_guard <launcher pid> <command> [args...]

Deploy's children must not outlive a deploy killed by SIGKILL. The death signal is
asked for here, in a process of its own that then execs the command, rather than in a
subprocess.Popen preexec_fn: a preexec_fn makes Python fork() (not vfork) and so run
gRPC's fork handlers, which restart gRPC's pollers in the child between fork and exec;
with deploy's health-check channels open, that child could abort in gRPC
(ev_epoll1_linux.cc "Check failed: wakeup_fd_->Wakeup().ok()") before it ever exec'd.
Linux only; elsewhere the command just runs.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
EXIT_LAUNCHER_GONE = 75  # the launcher died before the death signal was armed: nobody to serve


def arm_death_signal(sig: int = signal.SIGTERM) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m engines.orphan_guard <launcher pid> <command> [args...]")
    launcher, command = int(argv[0]), argv[1:]
    if arm_death_signal() and os.getppid() != launcher:  # it died before the prctl took hold
        sys.exit(EXIT_LAUNCHER_GONE)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
