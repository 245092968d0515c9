"""rl_agents.storage against a real S3 API (moto's server, `s3_server` in tests/conftest.py): the
run-directory operations the trainer uses, checkpoints published to and found on S3, and models
read from S3 through the node-local cache. The trainer itself on S3 (a killed worker resuming from
an S3 checkpoint) is in test_train.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from rl_agents import storage
from rl_agents.config import ConfigError
from rl_agents.fileio import WriteError
from rl_agents.train.checkpoint import COMPLETE, latest_complete, publish_checkpoint, resume_dir


def _staged(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _keys(uri: str) -> dict[str, int]:
    """{relative key: size} of every object under `uri`."""
    import pyarrow.fs

    fs, root = storage.filesystem(uri)
    return {i.path[len(root) + 1:]: i.size for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
            if i.type == pyarrow.fs.FileType.File}


def test_locations_join_name_and_refuse_unknown_schemes(tmp_path):
    uri = "s3://b/runs?endpoint_override=h:9&scheme=http"
    assert storage.join(uri, "x", "checkpoint_000002") == "s3://b/runs/x/checkpoint_000002?endpoint_override=h:9&scheme=http"
    assert storage.name(storage.join(uri, "checkpoint_000002")) == "checkpoint_000002"
    assert storage.is_uri(uri) and storage.is_uri("gs://b/r") and not storage.is_uri(f"file://{tmp_path}")
    assert storage.normalize(f"file://{tmp_path}/r") == f"{tmp_path}/r" == storage.join(f"file://{tmp_path}", "r")
    assert storage.join("~/runs", "a") == os.path.expanduser("~/runs/a")
    from rl_agents.train import TrainConfig

    assert TrainConfig(storage_path="gs://bucket/runs").storage_path == "gs://bucket/runs"  # no I/O to validate
    with pytest.raises(ConfigError, match=r"storage_path: ftp://h/runs: ftp:// is not a filesystem pyarrow opens"):
        TrainConfig(storage_path="ftp://h/runs")


def test_text_files_and_directories_on_s3(s3_server):
    run = s3_server("ops")
    assert not storage.exists(run) and storage.list_dirs(run) == []
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        storage.read_text(storage.join(run, "metrics.jsonl"))
    storage.write_text(storage.join(run, "checkpoint_000001", "a.txt"), "héllo\n")
    storage.write_text(storage.join(run, "metrics.jsonl"), '{"step": 0}\n{"step": 1}\n{"ste')
    assert storage.read_text(storage.join(run, "checkpoint_000001", "a.txt")) == "héllo\n"
    assert storage.list_dirs(run) == ["checkpoint_000001"]
    assert storage.is_file(storage.join(run, "metrics.jsonl")) and not storage.is_file(storage.join(run, "checkpoint_000001"))
    from rl_agents.train.metrics import read_metrics

    assert read_metrics(storage.join(run, "metrics.jsonl")) == [{"step": 0}, {"step": 1}]  # torn last line skipped
    storage.delete_dir(storage.join(run, "checkpoint_000001"))
    assert storage.list_dirs(run) == [] and _keys(run) == {"metrics.jsonl": 29}  # 12 + 12 + 5 bytes


def test_checkpoints_published_to_s3_complete_partial_and_failed(s3_server, tmp_path):
    run = s3_server("ckpt")
    files = {"config.json": b"{}", "model.safetensors": b"w" * 1000, "trainer/state.json": b'{"global_step": 1}'}
    staged = _staged(tmp_path / "staged", files)
    publish_checkpoint(staged, storage.join(run, "checkpoint_000001"), rank=0, world=1, note="1 ranks\n")
    publish_checkpoint(staged, storage.join(run, "checkpoint_000002"), rank=0, world=1)
    storage.write_text(storage.join(run, "checkpoint_000003", "config.json"), "{}")  # partial: no COMPLETE
    assert _keys(storage.join(run, "checkpoint_000001")) == {**{k: len(v) for k, v in files.items()}, COMPLETE: 8}
    assert latest_complete(run) == storage.join(run, "checkpoint_000002")
    assert resume_dir(None, run) == storage.join(run, "checkpoint_000002")
    assert resume_dir(None, s3_server("empty")) is None

    def disk_full(target):  # half-way through the upload, as the trainer's write-fault hook does
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    dest = storage.join(run, "checkpoint_000004")
    with pytest.raises(WriteError) as e:
        publish_checkpoint(staged, dest, rank=0, world=1, fault=disk_full)
    assert str(e.value).startswith(f"cannot write {storage.join(dest, 'model.safetensors')}") and e.value.errno == errno.ENOSPC
    assert not storage.exists(dest) and latest_complete(run) == storage.join(run, "checkpoint_000002")
    # Re-publishing a step (a killed attempt redone) replaces what was there.
    publish_checkpoint(_staged(tmp_path / "again", {"config.json": b"{1}"}), storage.join(run, "checkpoint_000001"),
                       rank=0, world=1)
    assert _keys(storage.join(run, "checkpoint_000001")) == {"config.json": 3, COMPLETE: 9}


def test_models_on_s3_load_through_one_node_local_copy(s3_server, tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from rl_agents.models import resolve_model

    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))  # this "node's" cache, empty
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    (tmp_path / "node-tmp").mkdir()
    ckpt = storage.join(s3_server("model"), "checkpoint_000004")
    storage.upload(tiny_model_dir, ckpt)
    storage.write_text(storage.join(ckpt, "trainer", "state.json"), "{}")  # resume state: not needed to load
    local = resolve_model(ckpt)
    assert Path(local).parent == tmp_path / "node-tmp" / storage.CACHE_DIR
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(p.name for p in Path(tiny_model_dir).iterdir())
    ours, theirs = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (local, tiny_model_dir))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert resolve_model(ckpt) == local  # cached: no second copy
    assert len(list(Path(local).parent.glob("uri-*"))) == 1
    storage.write_text(storage.join(ckpt, "generation_config.json"), "{}")  # rewritten: copied again
    assert resolve_model(ckpt) != local and len(list(Path(local).parent.glob("uri-*"))) == 2
    with pytest.raises(ValueError, match=r"no config.json there"):
        resolve_model(storage.join(ckpt, "trainer"))


def test_the_store_is_probed_and_credentials_stay_out_of_uris(s3_server):
    storage.probe(s3_server("probe"))  # writes, reads back and deletes one object
    bad = s3_server("probe").replace("s3://rl-agents/", "s3://no-such-bucket/")
    with pytest.raises(ValueError, match=r"cannot write, read and delete an object there"):
        storage.probe(bad)
    with pytest.raises(ValueError, match=r"no credentials in the URI"):
        storage.check_uri("s3://AKIA:secret@bucket/runs")
    from rl_agents.train import TrainConfig

    with pytest.raises(ConfigError, match=r"^storage_path: s3://\.\.\.@\.\.\.: no credentials"):
        TrainConfig(storage_path="s3://AKIA:secret@bucket/runs")


def test_a_failed_upload_leaves_no_truncated_object(s3_server, tmp_path, monkeypatch):
    run = s3_server("torn")
    staged = _staged(tmp_path / "staged", {"model.safetensors": b"w" * 100_000})

    def copy_half_then_fail(fin, fout, length=0):
        fout.write(fin.read(50_000))
        raise OSError(errno.EIO, "connection reset")
    monkeypatch.setattr(storage.shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(WriteError, match=r"^cannot write s3://rl-agents/torn-\d+/model.safetensors\?.*: connection reset"):
        storage.upload(staged, run)
    assert _keys(run) == {}  # pyarrow would have completed a 50 kB object on close


def test_one_download_per_node_and_old_copies_evicted(s3_server, tmp_path, monkeypatch):
    import tempfile
    import threading
    import time

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    uris = [s3_server("evict") for _ in range(storage.CACHE_KEEP + 2)]
    for k, uri in enumerate(uris):
        storage.write_text(storage.join(uri, "config.json"), "{}" + " " * k)
    downloads = []
    real = storage.download
    monkeypatch.setattr(storage, "download", lambda *a, **kw: (downloads.append(a[0]), real(*a, **kw))[1])
    got = []
    threads = [threading.Thread(target=lambda: got.append(storage.local_copy(uris[0]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and downloads == [uris[0]]  # four processes' worth of callers, one download
    # Rewritten in place with the same size: a new modification time, so a new copy.
    time.sleep(1.1)
    storage.write_text(storage.join(uris[0], "config.json"), "{}")
    assert storage.local_copy(uris[0]) != got[0] and len(downloads) == 2
    for uri in uris[1:]:
        storage.local_copy(uri)
    left = sorted(d.name for d in storage.cache_dir().glob("uri-*"))
    assert len(left) == storage.CACHE_KEEP
    newest = {Path(storage.local_copy(u)).name for u in uris[-storage.CACHE_KEEP:]}
    assert set(left) == newest and len(downloads) == 2 + len(uris) - 1  # the newest were still there
