"""A local run's Ray processes must not outlive their driver.

`ray.init()` without an address starts a GCS, a raylet, a dashboard agent, a runtime-env agent,
log and autoscaler monitors, and worker processes. When the driver ends normally it stops them.
When it is SIGKILLed (the OOM killer, `kill -9`, a CI timeout), the GCS and raylet notice, but the
agents were seen alive 33 s later, and a JVM or any other child the driver started is orphaned.

`start(driver_pid)` starts this module as a small detached process that, every 0.5 s, records
the driver's descendants (pid and start time, from /proc) and, once the driver is gone, sends
SIGTERM then SIGKILL to each recorded process that is still the same process (same start time,
so a reused pid is never hit). Linux only (/proc); elsewhere `start` does nothing.

    python -m rl_agents.reaper DRIVER_PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 2.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == b"Z":  # a zombie is already dead
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    out, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out[child] = starts[child]
                stack.append(child)
    return out


def _same(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


def watch(driver: int) -> None:
    me = os.getpid()
    driver_start = (_stat(driver) or (0, -1))[1]
    seen: dict[int, int] = {}
    while _same(driver, driver_start):
        seen.update(descendants(driver))
        seen.pop(me, None)
        seen = {p: s for p, s in seen.items() if _same(p, s)}
        time.sleep(POLL_S)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p, s in seen.items() if _same(p, s)]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _same(p, seen[p])]
        if not alive:
            return


def start(driver_pid: int | None = None) -> subprocess.Popen | None:
    """Start the reaper for `driver_pid` (default: this process); None where /proc is missing."""
    if not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen([sys.executable, "-m", "rl_agents.reaper", str(driver_pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
