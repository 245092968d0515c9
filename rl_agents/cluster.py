"""What a multi-node Ray cluster changes: which node a process is on, what each node can read, and
how new weights reach rollout workers on nodes that cannot read the driver's disk.

    weights = Weights.publish("runs/x/policies/iter0", version=1, max_bytes=2 * 2**30)
    worker.update_weights.remote(weights)      # inside the actor: engine.update_weights(weights.local_path())

A policy goes to the rollout workers in one of two ways:

- **through Ray's object store** (a multi-node cluster and a policy of at most `max_bytes`, e.g.
  `rollout.object_store_weights_mb`): the driver reads its files once (`ray.put`), each worker on
  another node copies them into a node-local directory (`$TMPDIR/rl_agents-weights/<digest>`,
  written atomically, shared by the workers of that node) and loads that. No shared disk needed.
- **by path** (one node; or a policy too big for the object store): every node must read the same
  path, i.e. the run directory is on shared storage (NFS, a mounted bucket). `unreadable_nodes`
  checks that before any work starts, so that a node-local `run_dir` fails at start with an error
  that says what to set, not hours later on the first update.
- **by URI** (a policy at `s3://...`, `gs://...`: `train.storage_path` is a URI): each node copies
  it from there once (`rl_agents.storage.local_copy`, without the checkpoint's `trainer/` state).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS_DIR = "rl_agents-weights"


def node_id() -> str | None:
    """The Ray node id of this process (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_alive(node: str | None) -> bool:
    return node is not None and any(n["NodeID"] == node for n in alive_nodes())


def multi_node() -> bool:
    import ray

    return ray.is_initialized() and len(alive_nodes()) > 1


def dir_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _signature(path: str) -> str:
    """What a node sees at `path`: its top-level names and file sizes (or 'missing')."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if p.is_file():
        return f"file:{p.stat().st_size}"
    return repr(sorted((f.name, f.stat().st_size if f.is_file() else -1) for f in p.iterdir()))


def _read_probe(path: str, name: str | None) -> str:
    if name is None:
        return _signature(path)
    try:
        return (Path(path) / name).read_text()
    except OSError:
        return "missing"


def unreadable_nodes(path: str | Path, *, probe: bool = True) -> list[str]:
    """The alive nodes (ids) that do not see `path` as this process does, asked by one zero-CPU task
    pinned to each other node: a probe file written here and read back (where `path` is a writable
    directory and `probe`), else the top-level names and sizes (for read-only trees, and for model
    directories that each node may hold its own copy of). A node that cannot be asked (it died or
    is draining meanwhile) is left out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = os.path.abspath(path)  # not resolve(): other nodes get the path the user gave, symlinks and all
    name = expected = None
    if probe and Path(path).is_dir() and os.access(path, os.W_OK):
        name, expected = f".rl_agents-probe-{secrets.token_hex(6)}", secrets.token_hex(8)
        (Path(path) / name).write_text(expected)
    try:
        if expected is None:
            expected = _signature(path)
        here = node_id()
        others = [n["NodeID"] for n in alive_nodes() if n["NodeID"] != here]
        check = ray.remote(num_cpus=0)(_read_probe)
        refs = {n: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(path, name)
                for n in others}
        blind = []
        for n, ref in refs.items():
            try:
                if ray.get(ref, timeout=120) != expected:
                    blind.append(n)
            except (ray.exceptions.RayError, TimeoutError):
                continue
        return blind
    finally:
        if name is not None:
            (Path(path) / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class Weights:
    """A policy for the rollout workers: its path on the publishing node, a version number (counted
    per run: 0 = the initial policy) and, when shipped, an object-store reference to its files."""

    path: str
    version: int = 0
    node: str | None = None
    """Node id of the process that published it (the driver)."""
    files: Any = None
    """`ray.ObjectRef` of {relative path: bytes}, or None: read `path` directly."""
    digest: str = ""
    nbytes: int = 0

    @classmethod
    def publish(cls, path: str | Path, version: int = 0, max_bytes: int = 2 * 2**30) -> Weights:
        """Ship the files through the object store when the cluster has several nodes and the policy
        is at most `max_bytes`; else by path."""
        import ray

        from rl_agents import storage

        if storage.is_uri(path):  # every node reads it from there
            sizes = storage.file_sizes(path)
            return cls(str(path), version, node_id(), None, "",
                       sum(v for k, v in sizes.items() if not k.startswith("trainer/")))
        path = os.path.abspath(path)
        nbytes = dir_bytes(path)
        if not multi_node() or nbytes > max_bytes:
            return cls(path, version, node_id(), None, "", nbytes)
        root = Path(path)
        files = {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
        h = hashlib.blake2b(digest_size=12)
        for name, data in files.items():
            h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
            h.update(data)
        return cls(path, version, node_id(), ray.put(files), h.hexdigest(), nbytes)

    @property
    def shipped(self) -> bool:
        return self.files is not None

    def local_path(self) -> str:
        """A path this process can load: `path` itself on the publishing node (or when not shipped),
        else the node-local copy, made on first use."""
        import ray

        from rl_agents import storage

        if storage.is_uri(self.path):
            return storage.local_copy(self.path, skip=("trainer",))
        if self.files is None or node_id() == self.node:
            return self.path
        dst = Path(tempfile.gettempdir()) / WEIGHTS_DIR / self.digest
        if dst.is_dir():
            return str(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.digest}-", dir=dst.parent))
        try:
            for name, data in ray.get(self.files).items():
                out = tmp / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
            os.replace(tmp, dst)  # atomic; another worker of this node may have won the race
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not dst.is_dir():
                raise
        return str(dst)


def discard_local_copy(path: str | None) -> None:
    """Remove a node-local copy made by `Weights.local_path` (after the engine loaded a newer one)."""
    if path and Path(path).parent.name == WEIGHTS_DIR and Path(path).parent.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)
