"""A local Ray instance: loopback only, and no process outlives a killed driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from rl_agents import reaper

DRIVER = """
import time
import ray
from rl_agents.ray_utils import init_ray

init_ray(num_cpus=1)

@ray.remote
class Sleeper:
    def pid(self):
        import os
        return os.getpid()

s = Sleeper.remote()
print("actor", ray.get(s.pid.remote()), flush=True)
time.sleep(600)
"""


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    output = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        output.append(line)
        if not line and proc.poll() is not None:
            raise AssertionError(f"driver exited with {proc.returncode}: {''.join(output)[-2000:]}")
    raise AssertionError(f"no {prefix!r} line in {timeout} s")


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_and_dies_with_a_killed_driver():
    """SIGKILL the driver of a local run: every process it started (GCS, raylet, dashboard and
    runtime-env agents, the actor) is gone within seconds. While it runs, none of them listens on
    anything but 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        actor_pid = int(_wait_for_line(proc, "actor").split()[1])
        tree = reaper.descendants(proc.pid)
        assert actor_pid in tree
        names = {psutil.Process(p).name() for p in tree if psutil.pid_exists(p)}
        assert {"gcs_server", "raylet"} <= names, names
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in tree]
        assert listening, "found no listening socket of the Ray processes"
        loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}  # IPv4, IPv4-mapped, IPv6
        assert all(c.laddr.ip in loopback for c in listening), \
            sorted({(psutil.Process(c.pid).name(), c.laddr.ip) for c in listening})
        time.sleep(1.5)  # the reaper has recorded the whole tree
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        alive = dict(tree)
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = {p: s for p, s in alive.items() if reaper._same(p, s)}
        assert not alive, [psutil.Process(p).cmdline()[:2] for p in alive if psutil.pid_exists(p)]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_descendants_follow_the_tree_and_skip_other_processes():
    """A child and a grandchild of a process are its descendants; this test's parent is not."""
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        tree = {}
        while not tree and time.monotonic() < deadline:
            time.sleep(0.1)
            tree = reaper.descendants(child.pid)
        assert len(tree) == 1 and child.pid not in tree  # the grandchild
        mine = reaper.descendants(os.getpid())
        assert child.pid in mine and set(tree) <= set(mine) and os.getppid() not in mine
    finally:
        for p in reaper.descendants(child.pid):
            os.kill(p, signal.SIGKILL)
        child.kill()
