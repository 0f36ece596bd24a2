"""Model presets carry the real models' shapes: parameter counts match the published figures."""
from __future__ import annotations

import pytest

from jaxinfer.config import load_preset, list_presets

# Published parameter counts (model cards), in billions.
PUBLISHED = {"llama-3.2-1b": 1.24, "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.55, "mistral-7b": 7.24,
             "qwen2-7b": 7.62, "qwen2-72b": 72.71, "smollm2-135m": 0.1345}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    assert name in list_presets()
    assert load_preset(name).num_params / 1e9 == pytest.approx(PUBLISHED[name], rel=0.005)


def test_smollm2_preset_matches_the_shipped_gguf(smollm):
    config, _ = smollm
    preset = load_preset("smollm2-135m")
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "rope_theta", "tie_word_embeddings", "max_position_embeddings"]
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(config, f) for f in fields}


def test_unknown_preset_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="llama-3.1-8b"):
        load_preset("gpt-5")
