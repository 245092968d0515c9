"""Every examples/*_textshop.yaml runs end to end on a tiny model: weights change, metrics are finite.

The smoke overrides shrink the job (tiny random Llama with SmolLM2's tokenizer, 4 train tasks,
3-turn episodes, 16-token turns); everything else — Ray rollout actors, Ray Train + DeepSpeed with
LoRA, the merge back into full weights, evaluation, results.md and the PNG — is the real path.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from algorithms.base import Algorithm
from algorithms.runner import load_algorithm_config, run
from algorithms.cli import main
from rl_agents.models import tiny_llama_dir
from rl_agents.ray_utils import init_ray

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["model=tiny-llama", "env.train_tasks=4", "env.eval_tasks=2", "env.max_turns=3",
         "rollout.envs_per_worker=4", "rollout.max_new_tokens=16", "train.optim.batch_size=4",
         "train.optim.micro_batch_size=2", "train.optim.epochs=1", "train.optim.lr=0.01", "train.lora.r=4",
         "train.lora.alpha=8", "iterations=1"]


def _weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def ray_cluster(s3_server):  # the S3 server's credentials are in the environment before the workers start
    import ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft", "rft", "eto", "dmpo", "dpo", "step_dpo", "step_gail", "ppo", "grpo",
                                  "gigpo"])
def test_example_config_runs_and_learns(name, tmp_path, ray_cluster):
    start = _weights(tiny_llama_dir())
    if name == "sft":  # the library call, with the starting policy's row
        cfg = load_algorithm_config(ROOT / "examples" / f"{name}_textshop.yaml", SMOKE + [f"run_dir={tmp_path}"])
        rows = run(cfg, evaluate_base=True)
        assert [r["stage"] for r in rows] == ["start", "sft iter 1"]
    else:  # the command a user runs (`rl-agents train CONFIG overrides`), without the start row
        yaml = str(ROOT / "examples" / f"{name}_textshop.yaml")
        # A random tiny policy may earn no reward at all (every advantage 0): PPO's entropy bonus moves it then.
        extra = ["loss.entropy_coef=0.001"] if name in ("grpo", "gigpo") else []
        assert main(["train", yaml, "--no-start-eval", *SMOKE, *extra, f"run_dir={tmp_path}"]) == 0
        rows = json.loads((tmp_path / "results.json").read_text())
        assert [r["stage"] for r in rows] == [f"{name} iter 1"]
    state = Algorithm.restore(tmp_path)
    assert state.iteration == 1 and state.policy != str(tiny_llama_dir())
    end = _weights(state.policy)
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    # LoRA on every linear layer of every block: all their weights move once merged.
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed), changed
    metrics = state.history[-1]
    numeric = {k: v for k, v in metrics.items() if isinstance(v, float)}
    assert numeric and all(math.isfinite(v) for v in numeric.values()), numeric
    loss_key = {"sft": "loss/sft", "rft": "loss/sft", "eto": "loss/dpo", "dmpo": "loss/dmpo", "dpo": "loss/dpo",
                "step_dpo": "loss/step_dpo", "step_gail": "loss/ppo", "ppo": "loss/ppo", "grpo": "loss/ppo",
                "gigpo": "loss/ppo"}[name]
    assert loss_key in metrics
    if name in ("eto", "dmpo", "dpo", "step_dpo"):
        assert metrics["data/pairs"] >= 4  # a random tiny policy fails every task the expert solves
    if name in ("step_dpo", "step_gail"):  # every practice sample kept, with what it became
        kept = [json.loads(line) for line in (tmp_path / "trajectories" / "inspect_iter0.jsonl").read_text().splitlines()]
        assert len(kept) == metrics["inspect/steps"]
        if name == "step_dpo":
            assert sum(r["paired"] for r in kept) == metrics["data/pairs"]
        else:
            assert sum(r["reward"] for r in kept) / len(kept) == pytest.approx(metrics["reward/mean"], abs=1e-6)
    if name in ("eto", "dmpo", "dpo", "step_dpo", "step_gail", "ppo", "grpo", "gigpo"):
        assert metrics["sync/max_logprob_diff"] < 1e-3  # the rollout workers run the new weights
    if name in ("step_gail", "ppo", "grpo", "gigpo"):
        _assert_ppo_update(name, metrics, state, tmp_path)
    assert rows[-1]["stage"] == f"{name} iter 1" and "eval/test_seen/avg_reward" in rows[-1]
    assert (tmp_path / "results.md").read_text().count("|") > 6
    assert (tmp_path / "results.png").stat().st_size > 5_000
    assert (tmp_path / "policy").resolve() == Path(state.policy).resolve()


def _assert_ppo_update(name, metrics, state, run_dir: Path) -> None:
    """The first optimizer step of the PPO update sees ratio exactly 1 (old log-probs recomputed on the
    same micro-batches, here through DeepSpeed bf16); GAIL's discriminator trained and was saved."""
    from rl_agents.train.metrics import read_metrics

    (train_dir,) = (run_dir / "train").glob("iter0-ppo-*")  # named by the data's digest
    first = read_metrics(train_dir / "metrics.jsonl")[0]
    assert first["ppo/ratio_mean"] == 1.0 and first["ppo/clip_frac"] == 0.0 and first["kl/ref"] == 0.0, first
    if name in ("ppo", "grpo", "gigpo"):
        assert metrics["data/ppo_examples"] == 16  # 4 tasks × rollout.samples_per_task 4
        if metrics["explore/avg_reward"] == 0:  # a random tiny policy earns nothing: every advantage is 0
            assert metrics["advantage/abs_mean"] == 0 and metrics["loss/policy"] == 0
            assert metrics["data/zero_variance_groups"] == 4
    if name == "gigpo":  # step groups were formed: every task's first step answers the same task text
        assert metrics["gigpo/step_groups"] >= 4 and metrics["gigpo/grouped_steps_frac"] >= 16 / 48
    if name == "step_gail":
        assert metrics["inspect/steps"] == metrics["data/ppo_examples"] > metrics["data/expert_steps"] >= 4
        assert metrics["advantage/abs_mean"] > 0  # log D differs between a prefix's 3 samples
        assert metrics["disc/loss"] < metrics["disc/loss_before"] and 0 < metrics["disc/d_agent"] < 1
        assert metrics["reward/mean"] == pytest.approx(0.0, abs=1e-9) or metrics["reward/mean"] < 0  # log D ≤ 0
        head = state.discriminator()  # restored from discriminator.safetensors (iteration 1)
        assert (run_dir / "discriminator.safetensors").exists() and head.hidden == 256


@pytest.mark.slow
def test_dmpo_is_a_tune_trainable(tmp_path):
    """A β sweep is one `tune.Tuner` call; each trial runs DMPO and reports its metrics."""
    import ray
    from ray import tune

    from algorithms.preference import DMPO

    base = load_algorithm_config(ROOT / "examples" / "dmpo_textshop.yaml", SMOKE + ["env.eval_tasks=1"])
    ray.shutdown()  # the module's 2-CPU cluster, if the smoke runs came first
    init_ray(num_cpus=4)  # logical CPUs: trial + rollout actor + train worker
    try:
        tuner = tune.Tuner(DMPO.as_trainable(base), param_space={"loss.beta": tune.grid_search([0.1, 0.5])},
                           run_config=tune.RunConfig(storage_path=str(tmp_path), name="sweep"),
                           tune_config=tune.TuneConfig(max_concurrent_trials=1))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert not results.errors, results.errors
    df = results.get_dataframe()
    assert sorted(df["config/loss.beta"]) == [0.1, 0.5]
    assert all(math.isfinite(x) for x in df["loss/dmpo"]) and (df["data/pairs"] >= 4).all()
    assert "eval/test_seen/avg_reward" in df.columns


def _eto_records(n: int) -> tuple[list[dict], list[dict]]:
    """ETO-format SFT records and pair records made from TextShop's replayed experts, as ETO writes
    them: the instruction and the agent's "OK", then the task; ids are integers."""
    from rl_agents.experts import iter_expert_trajectories

    sft, pairs = [], []
    for k, traj in enumerate(iter_expert_trajectories("rl_agents/TextShop-v0", "train", n, progress=False)):
        system, task, *rest = traj.turns
        rest = rest[:-1] if rest[-1].role == "user" else rest  # ETO's records end with the agent's turn
        conv = lambda turns: [{"from": {"user": "human", "assistant": "gpt"}[t.role], "value": t.text}  # noqa: E731
                              for t in turns]
        prompt = [{"from": "human", "value": system.text}, {"from": "gpt", "value": "OK"},
                  {"from": "human", "value": task.text}]
        sft.append({"id": k, "conversations": prompt + conv(rest)})
        pairs.append({"id": k, "prompt": prompt, "chosen": conv(rest),
                      "rejected": [{"from": "gpt", "value": "Thought: I give up.\nAction: click[Back to Search]"}]})
    return sft, pairs


@pytest.mark.slow
def test_eto_format_files_train_directly(tmp_path, ray_cluster):
    """A user's own ETO-format files: SFT from `env.expert_data=FILE` (a JSON list with the "OK"
    opening), DMPO from `pairs_file=FILE` (ETO's pair format) with the released trainer's
    end-of-turn weight; the pairs it trained on export back to the same file."""
    sft_records, pair_records = _eto_records(4)
    (tmp_path / "sft.json").write_text(json.dumps(sft_records, indent=4))
    (tmp_path / "pairs.json").write_text(json.dumps(pair_records, indent=4))
    start = _weights(tiny_llama_dir())
    runs = {"sft": ["env.expert_data=" + str(tmp_path / "sft.json")],
            "dmpo": ["pairs_file=" + str(tmp_path / "pairs.json"), "loss.end_of_turn=one"]}
    for name, extra in runs.items():
        run_dir = tmp_path / name
        yaml = str(ROOT / "examples" / f"{name}_textshop.yaml")
        assert main(["train", yaml, "--no-start-eval", *SMOKE, *extra, f"run_dir={run_dir}"]) == 0
        state = Algorithm.restore(run_dir)
        metrics = state.history[-1]
        assert math.isfinite(metrics[f"loss/{name}"])
        end = _weights(state.policy)
        assert any(not torch.equal(start[k], end[k]) for k in start)
    assert metrics["data/pairs"] == 4 and "explore/avg_reward" not in metrics  # the file's pairs, no exploration
    assert main(["data", "convert", str(tmp_path / "dmpo" / "trajectories" / "pairs_iter0.jsonl"),
                 str(tmp_path / "back.json"), "--to", "conversation"]) == 0
    assert json.loads((tmp_path / "back.json").read_text()) == pair_records


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "gigpo"])
def test_alfworld_group_examples_run(name, tmp_path, ray_cluster):
    """examples/{grpo,gigpo}_alfworld.yaml on the tiny model: the update runs and moves the weights, and
    every explored episode records ALFWorld's state key of each step (GiGPO's anchors): equal at the
    shared reset, so each task's first steps form one step group."""
    from rl_agents.trajectory import read_jsonl
    from tests.envs.conftest import SHARED_ALFWORLD, alfworld_data_dir

    data = alfworld_data_dir()
    if data is None:
        pytest.skip(f"no ALFWorld games: set ALFWORLD_DATA or put them in {SHARED_ALFWORLD}")
    yaml = str(ROOT / "examples" / f"{name}_alfworld.yaml")
    assert main(["train", yaml, "--no-start-eval", *SMOKE, "loss.entropy_coef=0.001", "env.eval_tasks=1",
                 f"env.env_kwargs.data_dir={data}", f"run_dir={tmp_path}"]) == 0
    state = Algorithm.restore(tmp_path)
    metrics = state.history[-1]
    assert metrics["data/ppo_examples"] == 16 and math.isfinite(metrics["loss/ppo"])
    start, end = _weights(tiny_llama_dir()), _weights(state.policy)
    assert any(not torch.equal(start[k], end[k]) for k in start)
    explored = read_jsonl(tmp_path / "trajectories" / "explore_iter0.jsonl")
    assert len(explored) == 16
    for t in explored:
        assert len(t.metadata["state_keys"]) == t.num_steps >= 1
    for task in {t.task_id for t in explored}:
        assert len({t.metadata["state_keys"][0] for t in explored if t.task_id == task}) == 1
    assert len({t.metadata["state_keys"][0] for t in explored}) == 4  # four games, four start states
    if name == "gigpo":
        assert metrics["gigpo/grouped_steps_frac"] >= 16 / sum(t.num_steps for t in explored)


@pytest.mark.slow
def test_step_gail_with_a_lora_discriminator_runs(tmp_path, ray_cluster):
    """examples/step_gail_textshop.yaml with `discriminator.backbone=lora`: the adapter trains with the
    head, held-out accuracy is reported, the adapter is saved beside the head, the policy moves."""
    from safetensors.torch import load_file

    from algorithms.step_gail import DISC_FILE

    yaml = str(ROOT / "examples" / "step_gail_textshop.yaml")
    assert main(["train", yaml, "--no-start-eval", *SMOKE, "discriminator.backbone=lora", "discriminator.epochs=2",
                 "env.eval_tasks=1", f"run_dir={tmp_path}"]) == 0
    state = Algorithm.restore(tmp_path)
    metrics = state.history[-1]
    assert 0 <= metrics["disc/heldout_acc"] <= 1 and metrics["disc/heldout_steps"] >= 2
    assert math.isfinite(metrics["loss/ppo"]) and metrics["disc/loss"] < metrics["disc/loss_before"]
    saved = load_file(tmp_path / DISC_FILE)
    adapter = [k for k in saved if k.startswith("backbone.") and "lora_B" in k]
    assert adapter and any(saved[k].abs().sum() > 0 for k in adapter)  # lora_B starts at 0: it trained
    start, end = _weights(tiny_llama_dir()), _weights(state.policy)
    assert any(not torch.equal(start[k], end[k]) for k in start)


@pytest.mark.slow
def test_a_run_stored_on_s3_keeps_its_checkpoints_and_policies_there(tmp_path, ray_cluster, s3_server):
    """examples/sft_textshop.yaml (LoRA) with `train.storage_path` an S3 URI: the update's Ray Train run
    and the merged policy go to the run's own prefix on S3; run_dir keeps the results and two
    pointers. `runs/x/policy` still names the policy (through `policy.uri`), and it learned."""
    from rl_agents import storage
    from rl_agents.models import resolve_model

    uri = s3_server("smoke")
    yaml = str(ROOT / "examples" / "sft_textshop.yaml")
    assert main(["train", yaml, "--no-start-eval", *SMOKE, f"train.storage_path={uri}", f"run_dir={tmp_path}"]) == 0
    store = (tmp_path / "store.uri").read_text().strip()
    policy = (tmp_path / "policy.uri").read_text().strip()
    assert store.startswith(storage.join(uri, f"{tmp_path.name}-").partition("?")[0])
    assert policy == storage.join(store, "policies", "iter0")
    assert {"config.json", "model.safetensors"} <= set(storage.file_sizes(policy))
    (train_run,) = storage.list_dirs(storage.join(store, "train"))
    assert train_run.startswith("iter0-sft-") and storage.is_file(storage.join(store, "train", train_run, "metrics.jsonl"))
    assert not (tmp_path / "train").exists() and not (tmp_path / "policies").exists() and not (tmp_path / "policy").exists()
    assert Algorithm.restore(tmp_path).policy == policy
    local = resolve_model(tmp_path / "policy")
    assert local == resolve_model(policy)
    start, end = _weights(tiny_llama_dir()), _weights(local)
    assert any(not torch.equal(start[k], end[k]) for k in start if "q_proj" in k)
    assert json.loads((tmp_path / "results.json").read_text())[-1]["stage"] == "sft iter 1"
