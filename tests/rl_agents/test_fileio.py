"""Atomic writes keep the umask's modes, name the path on failure, and never lose the old content."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from rl_agents.fileio import WriteError, atomic_write_text, make_tmp_dir, replace_dir


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_files_and_dirs_get_the_umask_modes_not_owner_only(tmp_path, umask):
    """mkstemp/mkdtemp make 0600/0700; readers under another uid (shared storage, rollout actors)
    could not read results, configs or policies. Umask 022 gives 0644/0755, 027 gives 0640/0750."""
    atomic_write_text(tmp_path / "a.json", "{}")
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(make_tmp_dir(tmp_path, "policy")) == 0o755
    umask(0o027)
    atomic_write_text(tmp_path / "b.json", "{}")
    assert _mode(tmp_path / "b.json") == 0o640
    assert _mode(make_tmp_dir(tmp_path, "policy")) == 0o750


def test_merged_policy_dir_is_readable_by_others(tmp_path, umask, tiny_model_dir):
    """`merge_lora` writes a policy others can load (0755 dir, 0644 files under umask 022)."""
    from peft import LoraConfig, get_peft_model

    from algorithms.base import merge_lora
    from rl_agents.models import load_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    out = Path(merge_lora(str(tiny_model_dir), str(adapter), tmp_path / "policies" / "iter0"))
    assert _mode(out) == 0o755
    assert {f.name: _mode(f) for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
    assert (out / "model.safetensors").exists()


def test_merge_lora_failure_keeps_the_old_policy_and_no_temp_dir(tmp_path, tiny_model_dir):
    from algorithms.base import merge_lora

    out = tmp_path / "policies" / "iter0"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_text("old")
    with pytest.raises(Exception):
        merge_lora(str(tiny_model_dir), str(tmp_path / "no-such-adapter"), out)
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in out.parent.iterdir()) == ["iter0"]


def test_replace_dir_swaps_in_the_new_dir_and_removes_the_old(tmp_path):
    out, new = tmp_path / "out", make_tmp_dir(tmp_path, "out")
    out.mkdir()
    (out / "f").write_text("old")
    (new / "f").write_text("new")
    replace_dir(new, out)
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (root only) whose files can be grown until ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    path = tmp_path / "small"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_names_the_path_and_keeps_the_old_file(full_disk):
    target = full_disk / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(WriteError) as e:
        atomic_write_text(target, "x" * 1_000_000)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (f"cannot write {target}: No space left on device (the disk is full: free space or "
                            "point run_dir elsewhere)")
    assert target.read_text() == "old"
    assert sorted(p.name for p in full_disk.iterdir()) == ["results.json"]  # no temporary file left
