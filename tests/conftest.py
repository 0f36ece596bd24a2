"""Shared fixtures. The real default model (SmolLM2-135M-Instruct GGUF) and its HF transformers twin are loaded
once per session; HF (torch, fp32 CPU) is the independent oracle for logits and greedy tokens."""
from __future__ import annotations

import os

os.environ.setdefault("JAXINFER_QUIET", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests/multidevice/ runs in its own process with 8 virtual CPU devices (tests/test_multidevice.py starts it):
# the device count must be set before JAX starts, and the rest of the suite runs on one device.
MULTIDEVICE = os.environ.get("JAXINFER_MULTIDEVICE") == "1"
if MULTIDEVICE:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
collect_ignore = [] if MULTIDEVICE else ["multidevice"]


def pytest_collection_finish(session):
    """Nothing imported during collection may have changed the device count of this process."""
    import jax

    want = 8 if MULTIDEVICE else 1
    if jax.device_count() != want:
        raise pytest.UsageError(f"this test process has {jax.device_count()} devices, expected {want}: something "
                                "set XLA_FLAGS at import time")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxinfer.registry import resolve_model  # noqa: E402
from parallel_fixtures import llama_layout, smollm_truncated, smollm_truncated_packed  # noqa: E402,F401


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm(gguf_path):
    from jaxinfer.loaders.gguf import load_gguf

    return load_gguf(gguf_path, jnp.float32)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    """transformers' own tokenizer of the default GGUF (its GGUF reader needs torch): the tokenizer oracle."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
    from jaxinfer.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer (so text, chat templates and stop strings
    work), compiled in seconds: for front-end and server tests that need no real model."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      eos_token_id=2, bos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.hf.save_pretrained(path)
    return str(path)


def shared_data_path(*parts: str) -> str:
    """A file under the project's shared data folder, `../shared/data/` from the repository root. From a git
    worktree (whose `.git` is a file naming the main repository) that is beside the main checkout instead."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dot_git = os.path.join(root, ".git")
    if os.path.isfile(dot_git):
        with open(dot_git) as f:
            gitdir = f.read().strip().removeprefix("gitdir:").strip()  # <main>/.git/worktrees/<name>
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(os.path.join(root, gitdir)))))
    return os.path.join(root, "..", "shared", "data", *parts)


def wikitext_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    """n real-text token ids (WikiText-2 test split when present)."""
    path = shared_data_path("wikitext-2", "test.txt")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read(200_000)
    else:
        text = " ".join(f"Sentence number {i} talks about engines, caches and kernels." for i in range(2000))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[offset:offset + n]


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# One engine configuration shared by every test file that needs the real model, so the persistent compilation
# cache serves all of them after the first compile. The small KV pool (64 blocks = 1024 tokens) makes busy
# tests preempt, which they must survive with identical outputs. fp32 weights (the default is bf16) so that greedy
# tokens and logprobs can be held exactly to HF's fp32 ones.
SMALL_ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512, num_kv_blocks=64,
                    weight_dtype="float32", async_scheduling=True)  # the GPU default: one step in flight


@pytest.fixture(scope="session")
def llm():
    from jaxinfer import LLM

    return LLM("smollm2-135m", **SMALL_ENGINE)
