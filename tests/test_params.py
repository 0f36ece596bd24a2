"""The parameter declarations (jaxinfer.params) are what the model, the loaders and the packed-weight path read:
the shapes the loaders build equal the model's own init, and a model with a mix of plain and packed weights
runs and equals the same model with those weights dequantized."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.batch import SeqChunk, build_step_batch
from jaxinfer.config import ModelConfig
from jaxinfer.loaders.common import expected_shapes, random_params
from jaxinfer.model import LlamaModel, init_kv_cache
from jaxinfer.params import EMBED, KV_HEADS, MLP, Q_HEADS, VOCAB, Kind, model_specs, spec_by_key
from jaxinfer.quantization import dequantize, quantize
from jaxinfer.quantization.weight import packing_of

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, attention_bias=True)


def _batch(num_blocks=4, block_size=4):
    chunk = SeqChunk(list(range(1, 8)), 0, [2, 0])
    batch = build_step_batch([chunk], num_tokens=8, num_seqs=1, max_blocks=16, block_size=block_size,
                             num_blocks=num_blocks)
    return jax.tree.map(jnp.asarray, batch)


def test_declarations_match_the_models_own_init_and_the_hf_layout():
    for tied in (False, True):
        config = ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": tied})
        model = LlamaModel(config)
        kv = init_kv_cache(config, 4, 4, jnp.float32)
        init = jax.eval_shape(lambda: model.init(jax.random.key(0), kv, _batch()))["params"]
        loaded = random_params(config, jnp.float32)
        assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, loaded)
        specs = spec_by_key(config)
        assert ("embed" in specs) == (not tied)
        assert specs["layers_1/wq"].axes == (EMBED, Q_HEADS) and specs["layers_1/wk"].axes == (EMBED, KV_HEADS)
        assert specs["layers_0/w_down"].axes == (MLP, EMBED) and specs["lm_head"].axes == (EMBED, VOCAB)
        # HF stores linear weights [out, in]: hand-written for one of each kind
        hf = expected_shapes(config)
        assert hf["model.layers.0.self_attn.k_proj.weight"] == (16, 32)
        assert hf["model.layers.0.mlp.down_proj.weight"] == (32, 64)
        assert hf["model.embed_tokens.weight"] == (64, 32)
        assert hf["model.layers.1.self_attn.q_proj.bias"] == (32,)
        assert sum(s.kind == Kind.LINEAR for s in model_specs(config)) == 7 * config.num_layers


def test_model_runs_with_a_mix_of_plain_and_packed_weights():
    params = random_params(TINY, jnp.float32, seed=3)
    packed = jax.tree.map(lambda x: x, params)
    packed["layers_0"]["wq"] = quantize(params["layers_0"]["wq"], bits=4, group_size=16)
    packed["layers_1"]["w_down"] = quantize(params["layers_1"]["w_down"], bits=8, group_size=32, symmetric=False)
    dense = jax.tree.map(lambda x: x, params)
    dense["layers_0"]["wq"] = dequantize(packed["layers_0"]["wq"])
    dense["layers_1"]["w_down"] = dequantize(packed["layers_1"]["w_down"])
    assert [k for k, _ in packing_of(packed)] == ["layers_0/wq", "layers_1/w_down"]

    def logits(p, packing=()):
        model = LlamaModel(TINY, packing=packing)
        return model.apply({"params": p}, init_kv_cache(TINY, 4, 4, jnp.float32), _batch(), all_logits=True)[0]

    got, want = logits(packed, packing_of(packed)), logits(dense)
    np.testing.assert_allclose(np.asarray(got)[:7], np.asarray(want)[:7], rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(logits(params))[:7], np.asarray(want)[:7], atol=1e-5)  # packing was real
