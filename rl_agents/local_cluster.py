"""A real multi-node Ray cluster on one machine: for the cluster tests, the cluster benchmark, and
for trying a cluster layout before renting one.

    with LocalCluster(workers=1, cpus_per_node=1) as cluster:      # head + 1 worker node
        subprocess.run([python, "driver.py"], env=cluster.env())  # RAY_ADDRESS, token auth
        subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard_url, "--", ...], env=cluster.env())
        cluster.kill_node("w1")                                   # SIGKILL its raylet: a lost machine

Every node is its own `ray start --block` process tree, with its own `--temp-dir` (one shared
temp dir lets one node delete a job's unpacked working dir under the other), its own custom
resource (`{"<name>": 1}`: a test can place work on a node) and its own CPUs; nodes are stopped by
PID, never with `ray stop` (which would stop every Ray instance of the machine).

Isolation (`isolate=True`; the default where we are root and `ip netns`/`unshare` work): each
worker node runs in its own network namespace, joined to the head through a bridge (head
10.A.B.1, worker k 10.A.B.(k+1)), so nodes share no address; and in its own mount namespace with
a private tmpfs over `scratch` (`cluster.scratch`, also its TMPDIR): what the driver and the head
write under `scratch` (a run directory) the worker nodes cannot see, as on machines without a
shared disk. The venv, the repository and the model cache stay visible, as on nodes built from one
image. Without isolation the nodes listen on 127.0.0.1 and share the disk.

Token authentication (Ray 2.60) is on for every process of the cluster: `env()` sets
`RAY_AUTH_MODE=token` and they all read `~/.ray/auth_token`. A driver must get that variable
before it imports ray, which is why drivers are started as new processes with `env()`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# GCS health checks every second, a node dead after 5 missed (2 s each): a killed raylet is noticed in
# ~5-10 s, not Ray's ~15-30 s; lenient enough that a busy 2-core box does not lose a healthy node.
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                      "RAY_health_check_timeout_ms": "2000", "RAY_health_check_failure_threshold": "5"}


@dataclass
class Node:
    name: str
    ip: str
    proc: subprocess.Popen
    temp_dir: Path
    netns: str | None = None
    veth: str | None = None
    log: Path | None = None
    pids: set[int] = field(default_factory=set)


def isolation_available() -> bool:
    """Root, with `ip` and `unshare`: network and mount namespaces can be made."""
    return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("unshare"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class LocalCluster:
    def __init__(self, workers: int = 1, cpus_per_node: int = 1, *, head_cpus: int | None = None,
                 isolate: bool | None = None, object_store_mb: int = 1024, start: bool = True):
        self.isolate = isolation_available() if isolate is None else isolate
        if self.isolate and not isolation_available():
            raise RuntimeError("isolate=True needs root with `ip` and `unshare` (network and mount namespaces)")
        self.cpus_per_node = cpus_per_node
        self.head_cpus = cpus_per_node if head_cpus is None else head_cpus
        self.object_store_mb = object_store_mb
        self.id = secrets.token_hex(2)
        self.root = Path(tempfile.mkdtemp(prefix=f"rlc{self.id}-", dir="/tmp"))  # short: Ray's socket paths
        self.scratch = self.root / "scratch"
        self.scratch.mkdir()
        self.nodes: dict[str, Node] = {}
        self._namespaces: list[tuple[str, str]] = []
        self.bridge: str | None = None
        self.subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        self.head_ip = f"{self.subnet}.1" if self.isolate else "127.0.0.1"
        self.port = _free_port()
        self.dashboard_port = _free_port()
        self._next = 1
        if start:
            self.start(workers)

    # ---- environment of every process of the cluster ----------------------------------------
    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a driver (or `ray job ...` CLI) of this cluster."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        venv_bin = str(Path(sys.executable).parent)  # nodes and jobs run the environment's python
        env.update({"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "PATH": f"{venv_bin}:{env.get('PATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0", **FAST_HEALTH_CHECKS, **extra})
        return env

    # ---- nodes --------------------------------------------------------------------------------
    def start(self, workers: int) -> None:
        try:
            if self.isolate:
                self.bridge = f"rlcbr{self.id}"
                _run("ip", "link", "add", self.bridge, "type", "bridge")
                _run("ip", "addr", "add", f"{self.head_ip}/24", "dev", self.bridge)
                _run("ip", "link", "set", self.bridge, "up")
            self._start_node("head", self.head_ip, self.head_cpus, head=True)
            for _ in range(workers):
                self.add_node(wait=False)
            self.wait_for_nodes(1 + workers)
        except BaseException:
            self.stop()
            raise

    def add_node(self, cpus: int | None = None, *, resources: dict[str, float] | None = None,
                 wait: bool = True) -> str:
        """Start worker node `w<k>` (a replacement for a lost one, say); return its name."""
        name = f"w{self._next}"
        self._next += 1
        ip = f"{self.subnet}.{self._next}" if self.isolate else "127.0.0.1"
        netns = veth = None
        if self.isolate:
            netns, veth = f"rlc{self.id}{name}", f"rlc{self.id}{name}"
            self._namespaces.append((netns, veth))  # removed by stop() even if this node never starts
            _run("ip", "netns", "add", netns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            _run("ip", "link", "set", f"{veth}p", "netns", netns)
            _run("ip", "link", "set", veth, "master", self.bridge)
            _run("ip", "link", "set", veth, "up")
            for cmd in (("ip", "addr", "add", f"{ip}/24", "dev", f"{veth}p"), ("ip", "link", "set", f"{veth}p", "up"),
                        ("ip", "link", "set", "lo", "up")):
                _run("ip", "netns", "exec", netns, *cmd)
        self._start_node(name, ip, self.cpus_per_node if cpus is None else cpus, netns=netns, veth=veth,
                         resources=resources)
        if wait:
            self.wait_for_nodes(len(self.alive()))
        return name

    def _start_node(self, name: str, ip: str, cpus: int, *, head: bool = False, netns: str | None = None,
                    veth: str | None = None, resources: dict[str, float] | None = None) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}",
               f"--node-ip-address={ip}", f"--resources={json.dumps({name: 1, **(resources or {})})}",
               f"--object-store-memory={self.object_store_mb * 2**20}",
               # Ray's fixed default (52365) is taken by any other Ray on this machine, and then the
               # job agent never comes up ("No available agent to submit job").
               f"--dashboard-agent-listen-port={_free_port()}"]
        if head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=true", f"--dashboard-host={ip}",
                    f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += [f"--address={self.address}"]
        env = self.env()
        env.pop("RAY_ADDRESS")
        if netns is not None:  # own network namespace, own tmpfs over the scratch dir
            script = (f"mount -t tmpfs -o size=4g rlc-scratch {self.scratch} && "
                      f"exec env TMPDIR={self.scratch} \"$@\"")
            cmd = ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
                   "sh", "-c", script, "sh", *cmd]
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes[name] = Node(name, ip, proc, temp_dir, netns, veth, log)

    def alive(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.proc.poll() is None]

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        """Until the GCS counts `n` alive nodes (asked by a short driver process: token auth)."""
        probe = ("import ray, time, sys\n"
                 "ray.init(logging_level='ERROR')\n"
                 f"deadline = time.time() + {timeout}\n"
                 f"while sum(x['Alive'] for x in ray.nodes()) != {n}:\n"
                 "    if time.time() > deadline: sys.exit('timeout: ' + repr([(x['NodeManagerAddress'], x['Alive']) for x in ray.nodes()]))\n"
                 "    time.sleep(0.5)\n")
        deadline = time.time() + timeout
        while True:  # the GCS itself may not be listening yet
            dead = [name for name, node in self.nodes.items() if node.proc.poll() is not None and name == "head"]
            if dead:
                raise RuntimeError(f"the head node exited: {self.tail('head')}")
            r = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True,
                               timeout=timeout + 30)
            if r.returncode == 0:
                return
            if time.time() > deadline:
                logs = "\n".join(f"--- {k}\n{self.tail(k)}" for k in self.nodes)
                raise RuntimeError(f"cluster did not reach {n} nodes: {r.stderr[-2000:]}\n{logs}")
            time.sleep(1)

    def tail(self, name: str, chars: int = 3000) -> str:
        log = self.nodes[name].log
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def _tree(self, name: str) -> list:
        import psutil

        try:
            root = psutil.Process(self.nodes[name].proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def raylet_pid(self, name: str) -> int:
        for p in self._tree(name):
            try:
                if p.name() == "raylet":
                    return p.pid
            except Exception:  # noqa: BLE001 (a process gone meanwhile)
                continue
        raise RuntimeError(f"node {name}: no raylet process")

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet (its workers then exit), as when a machine is lost; then the rest."""
        os.kill(self.raylet_pid(name), signal.SIGKILL)
        time.sleep(0.5)
        self._stop_node(name)

    def _stop_node(self, name: str) -> None:
        import psutil

        node = self.nodes[name]
        procs = self._tree(name)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        try:
            node.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if node.netns:
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", node.veth], capture_output=True)

    def stop(self) -> None:
        """Stop every node by PID (workers first), remove the namespaces, the bridge and the temp dirs."""
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            self._stop_node(name)
        self._kill_strays()
        for netns, veth in self._namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        self._namespaces = []
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self.bridge = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_strays(self) -> None:
        """Ray workers re-parented away from a node's tree: found by their temp dir on the command line."""
        import psutil

        mark = str(self.root)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(mark in a for a in (p.info["cmdline"] or [])):
                    p.kill()
            except psutil.Error:
                continue

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
