"""benchmarks/learning.py's bookkeeping (benchmarks/learning_report.py): committed records, weight
digests, which stored results count.

The benchmark itself runs for hours and is measured, not tested; these check, on hand-made result
files, that a table is made from `--out` and the records together, that a result made from another
SFT policy is left out, and that a result made from identical SFT weights is kept.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("learning_benchmark", REPO / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _policy(path: Path, value: float) -> Path:
    import torch

    path.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), value)}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _result(algo: str, seen: float, unseen: float, run_id: str, sft_run_id: str | None, **extra) -> dict:
    return {"metrics": {"eval/test_seen/avg_reward": seen, "eval/test_seen/success_rate": seen,
                        "eval/test_unseen/avg_reward": unseen, "eval/test_unseen/success_rate": unseen},
            "num_tasks": {"test_seen": 2, "test_unseen": 2}, "algo": algo, "wall_s": 60.0, "run_id": run_id,
            "sft_run_id": sft_run_id, **extra}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_weights_digest_follows_the_bytes(learning, tmp_path):
    a, b, c = _policy(tmp_path / "a", 1.0), _policy(tmp_path / "b", 1.0), _policy(tmp_path / "c", 1.0 + 2 ** -10)
    assert learning.weights_sha256(a) == learning.weights_sha256(b)
    assert learning.weights_sha256(a) != learning.weights_sha256(c)
    assert learning.weights_sha256(tmp_path) is None  # no weights there


def test_report_merges_out_and_records_and_drops_other_sft_runs(learning, tmp_path):
    out, rec, md = tmp_path / "out", tmp_path / "records", tmp_path / "results.md"
    policy = _policy(tmp_path / "sft0_policy", 0.5)
    # seed 0: finished in --out (made before digests were recorded)
    _write(out / "textshop/seed0/sft/result.json", _result("sft", 0.4, 0.2, "sft0", None, policy=str(policy)))
    _write(out / "textshop/seed0/dpo/result.json", _result("dpo", 0.6, 0.4, "dpo0", "sft0"))
    # seed 1: only in the records (another machine); RFT from identical SFT weights under another run id,
    # DPO from different ones
    _write(rec / "textshop/seed1/sft.json", _result("sft", 0.6, 0.4, "sft1", None, policy_sha256="d1"))
    _write(rec / "textshop/seed1/rft.json", _result("rft", 0.9, 0.7, "rft1", "sft1-earlier", sft_policy_sha256="d1"))
    _write(rec / "textshop/seed1/dpo.json", _result("dpo", 1.0, 1.0, "dpo1", "sft1-earlier", sft_policy_sha256="d0"))

    rc = learning.main(["--report", "--envs", "textshop", "--seeds", "0,1", "--out", str(out),
                        "--records", str(rec), "--results", str(md)])
    assert rc == 0
    rows = {}  # the results table's rows (the settings table below it has rows of the same names)
    for line in md.read_text().splitlines():
        if line.startswith("| ") and " | " in line:
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line.split(" | "))
    # SFT: 0.4 (out) and 0.6 (records): mean 0.5, sample std 0.1 * sqrt(2)
    assert rows["SFT"][1] == f"0.500 ± {0.1 * math.sqrt(2):.3f}" and rows["SFT"][7] == "2/2"
    assert rows["RFT"][1:3] == ["0.900", "90.0"] and rows["RFT"][7] == "1/2"
    assert rows["DPO (fixed pairs)"][1] == "0.600" and rows["DPO (fixed pairs)"][7] == "1/2"  # seed 1's left out
    assert "DPO (fixed pairs), seed 1: not run" in md.read_text()
    # what --out had is now in the records, with the SFT weights' digest carried to the run made from it
    sft0 = json.loads((rec / "textshop/seed0/sft.json").read_text())
    assert sft0["policy_sha256"] == learning.weights_sha256(policy)
    assert json.loads((rec / "textshop/seed0/dpo.json").read_text())["sft_policy_sha256"] == sft0["policy_sha256"]
    assert json.loads((out / "textshop/seed0/sft/result.json").read_text())["policy_sha256"] == sft0["policy_sha256"]
    assert json.loads((rec / "textshop/settings.json").read_text()) == json.loads((out / "textshop/settings.json").read_text())


def test_a_run_made_from_identical_sft_weights_is_not_redone(learning, tmp_path, monkeypatch):
    rec = tmp_path / "records"
    monkeypatch.setattr(learning.learning_report, "RECORDS", rec)
    ran = []
    monkeypatch.setattr(learning, "run_algorithm", lambda hp, *a, **k: ran.append(hp["algo"]) or {"error": "stub"})
    env = {"name": "textshop"}
    args = SimpleNamespace(report=False, earlier_sft=False, smoke=False, threads=2)
    _write(rec / "textshop/seed0/step_dpo.json", _result("step_dpo", 0.7, 0.5, "s0", "sft-lost", sft_policy_sha256="d"))
    redone_sft = {"run_id": "sft-new", "policy_sha256": "d", "policy": str(tmp_path)}
    kept = learning.ensure("step_dpo", env, 0, tmp_path / "out/textshop/seed0", redone_sft, args, {})
    assert kept["run_id"] == "s0" and ran == []
    other_sft = {"run_id": "sft-other", "policy_sha256": "e", "policy": str(tmp_path)}
    result = learning.ensure("step_dpo", env, 0, tmp_path / "out/textshop/seed0", other_sft, args, {})
    assert ran == ["step_dpo"] and result["error"] == "stub"
    # a failed run is not recorded: the record made from the first weights stays
    assert json.loads((rec / "textshop/seed0/step_dpo.json").read_text())["run_id"] == "s0"


def test_runs_from_an_earlier_sft_run_are_reported_marked_only_with_earlier_sft(learning, tmp_path):
    out, rec, md = tmp_path / "out", tmp_path / "records", tmp_path / "results.md"
    # seed 0's SFT was redone ("sft0-redo"); DPO and the exploration were made from the lost one, RFT is
    # in the records from the lost one and in --out from the redone one
    _write(rec / "textshop/seed0/sft.json", _result("sft", 0.2, 0.1, "sft0-redo", None, policy_sha256="d2"))
    _write(rec / "textshop/seed0/dpo.json", _result("dpo", 0.8, 0.6, "dpo0", "sft0-lost", source="transcribed"))
    _write(rec / "textshop/seed0/rft.json", _result("rft", 0.9, 0.9, "rft0-old", "sft0-lost"))
    _write(out / "textshop/seed0/rft/result.json", _result("rft", 0.3, 0.3, "rft0-new", "sft0-redo"))
    _write(rec / "textshop/seed0/explore.json", {"sft_run_id": "sft0-lost", "seconds": 120.0, "num_tasks": 4,
                                                "success_rate": 0.25, "avg_reward": 0.25})
    argv = ["--report", "--envs", "textshop", "--seeds", "0", "--algos", "sft,rft,dpo", "--out", str(out),
            "--records", str(rec), "--results", str(md)]

    def rows():
        found = {}
        for line in md.read_text().splitlines():
            if line.startswith("| ") and " | " in line:
                found.setdefault(line.split(" | ")[0].lstrip("| "), line.split(" | "))
        return found

    assert learning.main(argv) == 0
    assert rows()["DPO (fixed pairs)"][1] == "—" and "DPO (fixed pairs), seed 0: not run" in md.read_text()
    assert "SFT agent's shared exploration" not in md.read_text()
    assert learning.main(argv + ["--earlier-sft"]) == 0
    text = md.read_text()
    assert rows()["DPO (fixed pairs)"][1:3] == ["0.800", "80.0"] and rows()["DPO (fixed pairs)"][7] == "1/1"
    assert rows()["RFT"][1] == "0.300"  # the run from the current SFT, not the earlier one
    assert ("DPO (fixed pairs), seed 0: made from an earlier SFT run of seed 0 (`sft0-lost`), not from the one in "
            "the SFT row") in text and "RFT, DPO (fixed pairs), seed 0: made from" not in text
    assert "DPO (fixed pairs) seed 0: transcribed" in text
    assert "success 25.0%" in text and "seed 0's by its earlier SFT run `sft0-lost`" in text
    # nothing from the earlier SFT run is written back into the records as current
    assert json.loads((rec / "textshop/seed0/rft.json").read_text())["run_id"] == "rft0-new"
    assert "earlier_sft" not in json.loads((rec / "textshop/seed0/dpo.json").read_text())
    assert "earlier_sft" not in json.loads((rec / "textshop/seed0/explore.json").read_text())


def test_table_intervals_and_paired_counts_from_per_task_records(learning, tmp_path):
    """Two seeds on the same 4 tasks, per-task [reward, success] recorded. ETO vs SFT on test_seen, each
    task by its mean over the seeds: a +0.75 (won), b (+0.5 and -0.5) 0, c and d 0: 1/0/3, p = 1. A
    record with only rates (0/1 outcomes, 1 of 4) is rebuilt as [1, 0, 0, 0] for its interval."""
    rec, md = tmp_path / "records", tmp_path / "results.md"

    def result(algo, seen: dict, unseen_rate: float):
        r = _result(algo, sum(v for v in seen.values()) / 4, unseen_rate, f"{algo}-run", None if algo == "sft" else "s")
        r["num_tasks"] = {"test_seen": 4, "test_unseen": 4}
        r["per_task"] = {"test_seen": {t: [v, int(v == 1.0)] for t, v in seen.items()}}
        return r

    base = {"a": 0.0, "b": 0.5, "c": 1.0, "d": 0.2}
    _write(rec / "textshop/seed0/sft.json", {**result("sft", base, 0.25), "run_id": "s"})
    _write(rec / "textshop/seed1/sft.json", {**result("sft", base, 0.25), "run_id": "s"})
    _write(rec / "textshop/seed0/eto.json", result("eto", {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.2}, 0.5))
    _write(rec / "textshop/seed1/eto.json", result("eto", {"a": 0.5, "b": 0.0, "c": 1.0, "d": 0.2}, 0.5))
    argv = ["--report", "--envs", "textshop", "--seeds", "0,1", "--algos", "sft,eto", "--out", str(tmp_path / "out"),
            "--records", str(rec), "--results", str(md)]
    assert learning.main(argv) == 0
    rows = {}
    for line in md.read_text().splitlines():
        if line.startswith("| ") and " | " in line:
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line.split(" | "))
    eto, sft = rows["ETO"], rows["SFT"]
    assert eto[3] == "1/0/3, p=1" and sft[3] == "—"
    assert sft[1].startswith("0.425 [")  # the mean of its 4 tasks (the same on both seeds)
    assert eto[1].startswith(f"{(3.2 + 1.7) / 8:.3f} [")
    # test_unseen has no per-task record: rates 0.25 / 0.5 of 4 rebuilt as 0/1 outcomes; no paired count
    assert sft[4].startswith("0.250 [0.000, ") and eto[5].startswith("50.0 [") and eto[6] == "—"
