"""Tiny random-weight models of each supported architecture: jaxinfer logits vs HF transformers built from the
same weights (saved as safetensors and loaded through jaxinfer's loader)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import max_abs_diff
from jaxinfer.loaders import load_weights
from model_utils import prefill_logits

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

CASES = {
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral-sliding-window": (transformers.MistralConfig, dict(sliding_window=12, rope_theta=10000.0)),
    "qwen2-bias": (transformers.Qwen2Config, dict(rope_theta=1000000.0)),
    "llama-tied-mha": (transformers.LlamaConfig, dict(tie_word_embeddings=True, num_key_value_heads=4)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    cls, extra = CASES[request.param]
    torch.manual_seed(0)
    config = cls(**{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def test_logits_match_hf(tiny):
    name, hf, path = tiny
    config, params = load_weights(path, jnp.float32, verbose=False)
    if name == "qwen2-bias":
        assert config.attention_bias
    if name == "mistral-sliding-window":
        assert config.sliding_window == 12
    ids = np.random.default_rng(1).integers(0, 256, 40).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert max_abs_diff(prefill_logits(config, params, ids, block_size=8), ref) < 1e-4
    # Chunked prefill through the paged cache (chunks cross block boundaries) gives the same logits.
    assert max_abs_diff(prefill_logits(config, params, ids, block_size=8, chunk=13), ref) < 1e-4


def test_pallas_kernel_in_model_matches_hf(tiny):
    """The model with the Pallas ragged paged-attention kernel (interpret mode on CPU) instead of the XLA path."""
    _, hf, path = tiny
    config, params = load_weights(path, jnp.float32, verbose=False)
    ids = np.random.default_rng(2).integers(0, 256, 21).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = prefill_logits(config, params, ids, block_size=8, chunk=8, attention_backend="pallas_interpret")
    assert max_abs_diff(ours, ref) < 1e-4
