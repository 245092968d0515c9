"""benchmarks/learning.py's bookkeeping: which runs it skips, what --report reads, the table it makes.

The benchmark itself runs for hours and is measured, not tested; these work on hand-made result files.
"""

import json
from pathlib import Path

import pytest

from benchmarks import learning

REPO = Path(__file__).resolve().parents[1]


def _result(algo: str, seen: float, unseen: float, **extra) -> dict:
    """A finished result with rates only (as records made before 2026-12-02): 0/1 outcomes of 2 tasks."""
    return {"metrics": {"eval/test_seen/avg_reward": seen, "eval/test_seen/success_rate": seen,
                        "eval/test_unseen/avg_reward": unseen, "eval/test_unseen/success_rate": unseen},
            "num_tasks": {"test_seen": 2, "test_unseen": 2}, "algo": algo, "wall_s": 60.0, **extra}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _rows(md: Path) -> dict[str, list[str]]:
    """The results table's rows by label (the settings table below it has rows of the same names)."""
    rows = {}
    for line in md.read_text().splitlines():
        if line.startswith("| ") and " | " in line:
            rows.setdefault(line.split(" | ")[0].lstrip("| "), [c.strip() for c in line.strip("| ").split(" | ")])
    return rows


def test_report_reads_out_first_then_the_records_and_writes_nothing_else(tmp_path):
    """Seed 0's SFT is in --out (0.5) and, older, in the records (0.0): --out wins. Seed 1's is only in the
    records (1.0). SFT test_seen: mean of 0.5 and 1.0 = 0.75. RFT: seed 0 failed in --out (not counted),
    seed 1 in the records at 0.5. Fields an old record carries (digests, run ids) are ignored."""
    out, rec, md = tmp_path / "out", tmp_path / "records", tmp_path / "results.md"
    _write(out / "textshop/seed0/sft/result.json", _result("sft", 0.5, 0.5))
    _write(rec / "textshop/seed0/sft.json", _result("sft", 0.0, 0.0))
    _write(rec / "textshop/seed1/sft.json", _result("sft", 1.0, 0.5, policy_sha256="d", sft_run_id=None))
    _write(out / "textshop/seed0/rft/result.json", {"error": "RuntimeError: boom"})
    _write(rec / "textshop/seed1/rft.json", _result("rft", 0.5, 0.0, sft_run_id="x", earlier_sft="y"))
    files = sorted(tmp_path.rglob("*"))
    assert learning.main(["--report", "--envs", "textshop", "--seeds", "0,1", "--algos", "sft,rft,dpo",
                          "--out", str(out), "--records", str(rec), "--results", str(md),
                          "--chart", str(tmp_path / "chart.png")]) == 0
    rows, text = _rows(md), md.read_text()
    assert rows["SFT"][1].startswith("0.750 [") and rows["SFT"][-2:] == ["2/2", "1.0 ± 0.0"]
    assert rows["RFT"][1].startswith("0.500 [") and rows["RFT"][-2] == "1/2"
    assert rows["DPO (fixed pairs)"][1:4] == ["-", "-", "-"] and rows["DPO (fixed pairs)"][-2] == "0/2"
    assert "- RFT, seed 0: not run" in text and "- DPO (fixed pairs), seed 1: not run" in text
    assert sorted(tmp_path.rglob("*")) == sorted(files + [md, tmp_path / "chart.png"])  # no settings, no copies


def test_a_run_is_skipped_when_out_or_the_records_have_it_and_sft_reruns_when_its_weights_are_needed(
        tmp_path, monkeypatch):
    ran = []

    def fake_run(algo, env, seed, seed_dir, sft, args):
        ran.append(algo)
        return {"algo": algo, "policy": str(seed_dir / algo), "from_sft": sft and sft["policy"]}

    monkeypatch.setattr(learning, "run", fake_run)
    out, rec = tmp_path / "out", tmp_path / "records"
    args = learning.parse_args(["--envs", "textshop", "--algos", "rft,dpo,eto", "--out", str(out),
                                "--records", str(rec)])
    env = learning.env_settings("textshop", args)
    # --out has SFT (its weights) and DPO, the records RFT, --out a crashed ETO: only ETO runs, from --out's SFT
    _write(out / "textshop/seed0/sft/result.json", _result("sft", 0.5, 0.5, policy="out-sft"))
    _write(out / "textshop/seed0/dpo/result.json", _result("dpo", 0.5, 0.5))
    _write(rec / "textshop/seed0/rft.json", _result("rft", 0.5, 0.5))
    _write(out / "textshop/seed0/eto/result.json", {"error": "RuntimeError: boom"})
    results = learning.seed_results(env, 0, args)
    assert ran == ["eto"] and results["eto"]["from_sft"] == "out-sft" and results["rft"]["algo"] == "rft"
    # seed 1: SFT and RFT only in the records (another machine): SFT runs again, since ETO and DPO need its weights
    ran.clear()
    _write(rec / "textshop/seed1/sft.json", _result("sft", 0.5, 0.5, policy="lost"))
    _write(rec / "textshop/seed1/rft.json", _result("rft", 0.5, 0.5))
    results = learning.seed_results(env, 1, args)
    assert ran == ["sft", "dpo", "eto"] and results["eto"]["from_sft"] == str(out / "textshop/seed1/sft")
    # ... but not when everything else is done too
    ran.clear()
    for algo in ("dpo", "eto"):
        _write(rec / f"textshop/seed2/{algo}.json", _result(algo, 0.5, 0.5))
    _write(rec / "textshop/seed2/sft.json", _result("sft", 0.5, 0.5))
    _write(rec / "textshop/seed2/rft.json", _result("rft", 0.5, 0.5))
    learning.seed_results(env, 2, args)
    assert ran == []
    # --report runs nothing
    args.report = True
    assert learning.seed_results(env, 3, args) == {a: None for a in args.algos} and ran == []


def test_table_cells_from_per_task_records_over_two_seeds(tmp_path):
    """Two seeds on the same 4 tasks, per-task [reward, success] recorded. ETO vs SFT on test_seen, each
    task by its mean over the seeds: a +0.75 (won), b (+0.5 and -0.5) 0, c and d 0: 1/0/3, p = 1. ETO's
    test_seen reward: (3.2 + 1.7) / 8; success: 3 of 4 tasks on seed 0, 1 of 4 on seed 1: 50%.
    test_unseen has only rates, 0.25 / 0.5 of 4 tasks: rebuilt as 0/1 outcomes, no paired count."""
    rec, md = tmp_path / "records", tmp_path / "results.md"

    def result(algo, seen: dict, unseen_rate: float):
        r = _result(algo, sum(seen.values()) / 4, unseen_rate)
        r["num_tasks"] = {"test_seen": 4, "test_unseen": 4}
        r["per_task"] = {"test_seen": {t: [v, int(v == 1.0)] for t, v in seen.items()}}
        return r

    base = {"a": 0.0, "b": 0.5, "c": 1.0, "d": 0.2}
    for seed in (0, 1):
        _write(rec / f"textshop/seed{seed}/sft.json", result("sft", base, 0.25))
    _write(rec / "textshop/seed0/eto.json", result("eto", {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.2}, 0.5))
    _write(rec / "textshop/seed1/eto.json", result("eto", {"a": 0.5, "b": 0.0, "c": 1.0, "d": 0.2}, 0.5))
    assert learning.main(["--report", "--envs", "textshop", "--seeds", "0,1", "--algos", "sft,eto", "--out",
                          str(tmp_path / "out"), "--records", str(rec), "--results", str(md)]) == 0
    sft, eto = _rows(md)["SFT"], _rows(md)["ETO"]
    assert eto[3] == "1/0/3, p=1" and sft[3] == "-"
    assert sft[1].startswith("0.425 [")  # the mean of its 4 tasks (the same on both seeds)
    assert eto[1].startswith(f"{(3.2 + 1.7) / 8:.3f} [")
    assert eto[2].startswith("50.0% [")
    assert sft[4].startswith("0.250 [0.000, ") and eto[5].startswith("50.0% [") and eto[6] == "-"
    assert "Rows without task ids" in md.read_text()


def test_every_algorithm_config_is_valid_and_the_committed_settings_are_current():
    """Each algorithm's spec builds its config (the `loss:` section included) on both envs, and the
    settings pinned in the records are what the code resolves now (else a run into them would stop)."""
    from algorithms.runner import get_algorithm
    from rl_agents.config import from_dict

    args = learning.parse_args(["--report"])
    for name in learning.ENVS:
        env = learning.env_settings(name, args)
        for algo in learning.HPARAMS:
            hp = learning.resolve_hparams(algo, name, smoke=False)
            cfg = from_dict(get_algorithm(hp["algo"]).config_class,
                            learning.spec(hp, env, 0, Path("/tmp/x"), "smollm2-135m", 2, "explore.jsonl"))
            assert cfg.evaluate_every == 0 and cfg.iterations == hp["iterations"]
            if "loss" in hp["config"]:
                assert cfg.loss.beta == 0.5
        committed = REPO / "benchmarks/results/learning" / name / "settings.json"
        assert json.loads(committed.read_text()) == learning.settings(env, args)


def test_other_settings_stop_a_run(tmp_path):
    args = learning.parse_args(["--envs", "textshop", "--out", str(tmp_path / "out"), "--records", str(tmp_path / "r")])
    env = learning.env_settings("textshop", args)
    learning.pin_settings(env, args)
    assert (tmp_path / "r/textshop/settings.json").exists()
    learning.pin_settings(env, args)  # the same settings: fine
    # Settings pinned before an algorithm was added: still valid, rewritten with the new one's row.
    pinned = tmp_path / "r/textshop/settings.json"
    old = json.loads(pinned.read_text())
    del old["hparams"]["gigpo"]
    pinned.write_text(json.dumps(old))
    learning.pin_settings(env, args)
    assert "gigpo" in json.loads(pinned.read_text())["hparams"]
    old["hparams"]["ppo"]["iterations"] = 5  # ... but not when an old algorithm's settings changed
    pinned.write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="other settings .*hparams"):
        learning.pin_settings(env, args)
    pinned.unlink()
    learning.pin_settings(env, args)
    args.best_of = 3
    with pytest.raises(SystemExit, match="other settings .*best_of"):
        learning.pin_settings(env, args)


def test_results_of_another_sft_run_are_run_again_and_reported_marked(tmp_path, monkeypatch):
    """Seed 0's SFT record is run "new"; RFT was made from it, DPO from an earlier SFT run "old" of the
    same seed. A run redoes DPO only; --report shows DPO, marked as made from "old"."""
    ran = []

    def fake_run(algo, env, seed, seed_dir, sft, args):
        ran.append(algo)
        return {**_result(algo, 0.5, 0.5), "policy": "p", "run_id": algo, "sft_run_id": sft["run_id"]}

    monkeypatch.setattr(learning, "run", fake_run)
    out, rec, md = tmp_path / "out", tmp_path / "records", tmp_path / "results.md"
    _write(out / "textshop/seed0/sft/result.json", _result("sft", 0.5, 0.5, policy="p", run_id="new"))
    _write(rec / "textshop/seed0/rft.json", _result("rft", 0.5, 0.5, sft_run_id="new"))
    _write(rec / "textshop/seed0/dpo.json", _result("dpo", 1.0, 1.0, sft_run_id="old"))
    common = ["--envs", "textshop", "--seeds", "0", "--algos", "rft,dpo", "--out", str(out), "--records", str(rec)]
    assert learning.main(["--report", *common, "--results", str(md), "--chart", str(tmp_path / "c.png")]) == 0
    assert "- DPO (fixed pairs), seed 0: made from an earlier SFT run of seed 0 (`old`)" in md.read_text()
    assert _rows(md)["DPO (fixed pairs)"][1].startswith("1.000")
    args = learning.parse_args(common)
    results = learning.seed_results(learning.env_settings("textshop", args), 0, args)
    assert ran == ["dpo"] and results["dpo"]["sft_run_id"] == "new" and results["rft"]["sft_run_id"] == "new"


def test_an_sft_run_redone_to_identical_weights_keeps_the_results_made_from_the_one_it_replaced(tmp_path, monkeypatch):
    """SFT "new" (in --out) has the weights b"abc" in model.safetensors. DPO's record was made from SFT run
    "old" with those bytes' digest: kept, not marked. RFT's from "old" with another digest: run again.
    ETO's from "old" with no digest (made before digests were recorded): run again."""
    import hashlib

    ran = []

    def fake_run(algo, env, seed, seed_dir, sft, args):
        ran.append(algo)
        return {**_result(algo, 0.5, 0.5), "run_id": algo, "sft_run_id": sft["run_id"],
                "sft_policy_sha256": learning.sft_digest(sft)}

    monkeypatch.setattr(learning, "run", fake_run)
    out, rec, md = tmp_path / "out", tmp_path / "records", tmp_path / "results.md"
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"abc")
    (policy / "config.json").write_text("{}")  # not part of the digest
    digest = hashlib.sha256(b"model.safetensors\0abc").hexdigest()
    assert learning.weights_sha256(policy) == digest and learning.weights_sha256(tmp_path / "none") is None
    _write(out / "textshop/seed0/sft/result.json", _result("sft", 0.5, 0.5, policy=str(policy), run_id="new"))
    _write(rec / "textshop/seed0/dpo.json", _result("dpo", 1.0, 1.0, sft_run_id="old", sft_policy_sha256=digest))
    _write(rec / "textshop/seed0/rft.json", _result("rft", 1.0, 1.0, sft_run_id="old", sft_policy_sha256="f" * 64))
    _write(rec / "textshop/seed0/eto.json", _result("eto", 1.0, 1.0, sft_run_id="old"))
    common = ["--envs", "textshop", "--seeds", "0", "--algos", "rft,dpo,eto", "--out", str(out), "--records", str(rec)]
    assert learning.main(["--report", *common, "--results", str(md), "--chart", str(tmp_path / "c.png")]) == 0
    text = md.read_text()
    assert "DPO (fixed pairs), seed 0: made from" not in text and "- RFT, seed 0: made from an earlier SFT run" in text
    assert "- ETO, seed 0: made from an earlier SFT run" in text
    args = learning.parse_args(common)
    results = learning.seed_results(learning.env_settings("textshop", args), 0, args)
    assert ran == ["rft", "eto"] and results["dpo"]["sft_run_id"] == "old"
    assert results["rft"]["sft_policy_sha256"] == digest


def test_the_engine_is_a_rollout_setting_not_a_result_setting(tmp_path):
    """--engine vllm reaches the rollout workers' config, leaves the pinned settings as they are, and a result
    made with it is noted under the table."""
    hf = learning.parse_args(["--envs", "textshop", "--report"])
    vllm = learning.parse_args(["--envs", "textshop", "--report", "--engine", "vllm"])
    env_hf, env_vllm = learning.env_settings("textshop", hf), learning.env_settings("textshop", vllm)
    assert learning.settings(env_hf, hf) == learning.settings(env_vllm, vllm)
    hp = learning.resolve_hparams("grpo", "textshop", smoke=False)
    assert learning.spec(hp, env_vllm, 0, tmp_path, "m", 2, None)["rollout"]["engine"] == "vllm"
    assert learning.spec(hp, env_hf, 0, tmp_path, "m", 2, None)["rollout"]["engine"] == "hf"
    rec, md = tmp_path / "records", tmp_path / "results.md"
    _write(rec / "textshop/seed0/sft.json", _result("sft", 0.5, 0.5, run_id="s"))
    _write(rec / "textshop/seed0/grpo.json", _result("grpo", 1.0, 1.0, sft_run_id="s", engine="vllm"))
    assert learning.main(["--report", "--envs", "textshop", "--seeds", "0", "--algos", "grpo", "--out",
                          str(tmp_path / "out"), "--records", str(rec), "--results", str(md)]) == 0
    assert "- GRPO, seed 0: rollouts (exploration and evaluation) with the vLLM engine" in md.read_text()
    assert "- SFT, seed 0: rollouts" not in md.read_text()
