"""HF safetensors loader: tiny random HF models saved by transformers, loaded back weight for weight."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxinfer.config import UnsupportedModelError  # noqa: E402
from jaxinfer.loaders.common import CheckpointError  # noqa: E402
from jaxinfer.loaders.safetensors import load_safetensors  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-6)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}
LINEARS = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
           "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


def _save_hf(arch, out_dir, torch_dtype=torch.float32, **save_kw):
    cfg_cls, model_cls, extra = MODELS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**SMALL, **extra)
    model = getattr(transformers, model_cls)(config).to(torch_dtype).eval()
    with torch.no_grad():  # norms are initialised to ones; randomise them so a mixed-up norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    model.save_pretrained(str(out_dir), **save_kw)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def _assert_params_equal(config, params, sd):
    def eq(ours, theirs):
        ours = np.asarray(ours.astype(jnp.float32))
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)

    eq(params["final_norm"], sd["model.norm.weight"])
    if config.tie_word_embeddings:  # one [hidden, vocab] matrix serves the lookup and the LM head
        assert "embed" not in params
        eq(params["lm_head"], sd["model.embed_tokens.weight"].T)
    else:
        eq(params["embed"], sd["model.embed_tokens.weight"])
        eq(params["lm_head"], sd["lm_head.weight"].T)
    # docs/ARCHITECTURE.md: one "layers_{i}" dict per layer (Flax linen submodule names)
    assert sorted(k for k in params if k.startswith("layers_")) == [f"layers_{i}" for i in range(config.num_layers)]
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        p = f"model.layers.{i}."
        eq(layer["attn_norm"], sd[p + "input_layernorm.weight"])
        eq(layer["mlp_norm"], sd[p + "post_attention_layernorm.weight"])
        for ours, hf in LINEARS.items():
            eq(layer[ours], sd[p + hf + ".weight"].T)  # stored [in, out]
        if config.attention_bias:
            for ours, hf in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
                eq(layer[ours], sd[p + "self_attn." + hf + ".bias"])
        else:
            assert "bq" not in layer


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_single_file_round_trip(arch, tmp_path):
    sd = _save_hf(arch, tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    config, params = load_safetensors(str(tmp_path), jnp.float32)
    assert config.architecture == arch
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.rope_theta == 5000.0  # transformers 5 stores it under rope_parameters
    assert config.attention_bias == (arch == "qwen2")
    assert config.sliding_window == (32 if arch == "mistral" else None)
    assert params["lm_head"].dtype == jnp.float32
    _assert_params_equal(config, params, sd)


def test_sharded_round_trip(tmp_path):
    sd = _save_hf("qwen2", tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "model.safetensors.index.json")
    config, params = load_safetensors(str(tmp_path), jnp.float32)
    _assert_params_equal(config, params, sd)


def test_bf16_checkpoint(tmp_path):
    sd = _save_hf("llama", tmp_path, torch_dtype=torch.bfloat16, max_shard_size="40KB")
    config, params = load_safetensors(str(tmp_path), jnp.bfloat16)
    assert params["layers_0"]["wq"].dtype == jnp.bfloat16
    _assert_params_equal(config, params, sd)  # bf16 -> bf16 is exact


def test_head_dtype_applies_to_embedding_and_lm_head_only(tmp_path):
    sd = _save_hf("llama", tmp_path)  # untied: separate embedding and LM head
    config, params = load_safetensors(str(tmp_path), jnp.bfloat16, head_dtype=jnp.float32)
    assert params["embed"].dtype == params["lm_head"].dtype == jnp.float32
    assert params["layers_0"]["wq"].dtype == params["final_norm"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), sd["lm_head.weight"].T)


def test_relative_path(tmp_path, monkeypatch):
    sd = _save_hf("llama", tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    config, params = load_safetensors("m", jnp.float32)
    _assert_params_equal(config, params, sd)


# ---------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    _save_hf("llama", d)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope"):
        load_safetensors(str(tmp_path / "nope"), jnp.float32)


def test_missing_config(saved_llama, tmp_path):
    d = _copy(saved_llama, tmp_path / "m")
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_safetensors(str(d), jnp.float32)


def test_no_safetensors_files(saved_llama, tmp_path):
    d = _copy(saved_llama, tmp_path / "m")
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_safetensors(str(d), jnp.float32)


def test_truncated_file(saved_llama, tmp_path):
    d = _copy(saved_llama, tmp_path / "m")
    file = d / "model.safetensors"
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="corrupt.*model.safetensors"):
        load_safetensors(str(d), jnp.float32)


def test_garbage_header(saved_llama, tmp_path):
    d = _copy(saved_llama, tmp_path / "m")
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    with pytest.raises(CheckpointError, match="corrupt.*model.safetensors"):
        load_safetensors(str(d), jnp.float32)


def test_missing_shard(tmp_path):
    _save_hf("llama", tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=f"missing.*{victim}"):
        load_safetensors(str(tmp_path), jnp.float32)


def test_missing_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    _save_hf("llama", tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_safetensors(str(tmp_path), jnp.float32)


def test_shape_mismatch(saved_llama, tmp_path):
    d = _copy(saved_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_proj.*shape"):
        load_safetensors(str(d), jnp.float32)


def test_unsupported_architecture(saved_llama, tmp_path):
    d = _copy(saved_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_safetensors(str(d), jnp.float32)


def test_rope_scaling_from_transformers5_rope_parameters(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = transformers.LlamaConfig(**{**SMALL, "rope_theta": None}, rope_parameters=rope)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    ours, _ = load_safetensors(str(tmp_path), jnp.float32)
    assert ours.rope_theta == 500000.0
    assert ours.rope_scaling_dict == {k: v for k, v in rope.items() if k != "rope_theta"}
