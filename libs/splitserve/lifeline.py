"""Child processes that die with their parent, without running Python between fork and exec.

A `subprocess.Popen(preexec_fn=...)` forks the whole interpreter and runs Python code in the child
before exec. In a process that holds gRPC channels this is unsafe: gRPC's fork handlers and its
poller threads race the child (seen as `epoll_wait error: Bad file descriptor` and an abort of the
new process). Without a preexec_fn, Popen spawns with vfork/exec and nothing runs in between.

So the child asks for its own death signal (Linux PR_SET_PDEATHSIG) as its first step instead:
- a `splitserve.launch.cli` child reads the parent's pid from SPLITSERVE_PARENT_PID (`child_env`) and
  calls `arm_from_env` before anything else;
- any other program (redis-server) is started through this module, `python -m splitserve.lifeline
  PARENT_PID -- PROGRAM ARGS...` (`wrap`), which arms the signal and then execs the program (the
  death signal survives exec).
Either way the child checks that its parent is still the one that started it: if the parent died
before the signal was armed, the child exits at once instead of living on as an orphan.

The signal fires when the parent *thread* that spawned the child exits, so spawn from a thread that
lives as long as the child should.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

from splitserve.config.env import PARENT_PID

ENV = PARENT_PID.name
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def arm(parent_pid: int) -> bool:
    """SIGTERM this process when its parent exits; exits now if the parent is already gone.
    False where the platform has no PR_SET_PDEATHSIG (the child then simply outlives a killed parent)."""
    if not sys.platform.startswith("linux"):
        return False
    # prctl from the symbols already loaded in this process (libc): find_library would run ldconfig
    # in a subprocess at every child's start.
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    return True


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a `splitserve.launch.cli` child that must die with this process."""
    return {**env, ENV: str(os.getpid())}


def arm_from_env() -> bool:
    """Arms the death signal for the parent named in SPLITSERVE_PARENT_PID, if set. The variable is
    removed so that this process's own children do not compare their parent with the wrong pid."""
    parent_pid = PARENT_PID.take()  # ValueError names the variable on a value that is no pid
    if parent_pid is None:
        return False
    return arm(int(parent_pid))


def wrap(argv: list[str]) -> list[str]:
    """The command line that runs `argv` as a child that dies with this process."""
    return [sys.executable, "-m", "splitserve.lifeline", str(os.getpid()), "--", *argv]


class SignalFlag:
    """Records SIGTERM / SIGINT in a plain attribute, for a main thread that waits for one.

    A Python signal handler runs in the main thread between two bytecodes, possibly while that
    thread is inside `threading.Event.set()` or `.wait()` holding the event's lock; a handler that
    calls `Event.set()` then blocks on that lock for ever. Seen: `splitserve up` hung in its shutdown
    when a second SIGTERM came while the first one's handler was setting the event. This handler
    takes no lock; the waiter polls."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.received: int | None = None  # the first signal number, once one came
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def wait(self, poll_s: float = 0.5) -> int:
        """Blocks until a signal came; returns its number."""
        while self.received is None:
            time.sleep(poll_s)
        return self.received


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        sys.exit("usage: python -m splitserve.lifeline PARENT_PID -- PROGRAM [ARGS...]")
    arm(int(args[0]))
    program = args[2:]
    os.execv(program[0], program)


if __name__ == "__main__":
    main()
