"""Runs in the vLLM environment (.venv-vllm, `make install-vllm`), started by test_vllm_engine.py:
the project's `VLLMEngine` on a real checkpoint, token ids in, ids + log-probs out. Prints one
JSON line; the test compares it with the trainer and the HF engine in the main environment."""

import json
import sys
import time


def main(model: str, prompts_json: str, full: str, adapter: str) -> None:
    from rl_agents.engines.base import SamplingParams
    from rl_agents.engines.vllm import VLLMEngine

    prompts, stop = json.loads(prompts_json)
    t0 = time.perf_counter()
    engine = VLLMEngine(model, dtype="float32", device="cpu", enforce_eager=True, kv_cache_memory_bytes=512 * 2**20)
    out = {"start_s": time.perf_counter() - t0}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=(stop,))
    sampled = SamplingParams(temperature=0.7, max_new_tokens=16, stop_token_ids=(stop,), seed=123)

    def gens(params):
        return [{"ids": g.token_ids, "lps": g.logprobs, "text": g.text, "finish": g.finish_reason}
                for g in engine.generate(prompts, params)]

    out["greedy"] = gens(greedy)
    out["sampled"] = gens(sampled)
    out["sampled_again"] = gens(sampled)
    out["sampled_other_seed"] = gens(SamplingParams(temperature=0.7, max_new_tokens=16, stop_token_ids=(stop,), seed=7))
    # A full-weight update (the CPU default: recreate the engine from the new checkpoint).
    t0 = time.perf_counter()
    engine.update_weights(full)
    out["reload_s"] = time.perf_counter() - t0
    out["after_full"] = gens(greedy)
    engine.sleep()
    engine.sleep()  # says so once
    engine.close()
    # A LoRA adapter update: a fresh LoRARequest on an engine made with enable_lora.
    engine = VLLMEngine(model, dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8, enforce_eager=True,
                        kv_cache_memory_bytes=512 * 2**20)
    engine.update_weights(adapter)
    out["after_lora"] = gens(greedy)
    engine.close()
    # logprobs_mode "processed": the log-probs of the distribution actually sampled (after temperature).
    engine = VLLMEngine(model, dtype="float32", device="cpu", logprobs_mode="processed", enforce_eager=True,
                        kv_cache_memory_bytes=512 * 2**20)
    out["processed"] = gens(sampled)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main(*sys.argv[1:5])
