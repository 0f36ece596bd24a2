"""Model configuration: one dataclass for the whole Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

# HF `architectures[0]` / `model_type` -> our family name.
_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class UnsupportedModelError(ValueError):
    """The checkpoint describes an architecture jaxinfer does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # HF rope_scaling dict, frozen as sorted items
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"
    name: str = ""

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; jaxinfer supports {SUPPORTED_ARCHITECTURES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * i + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def kv_bytes_per_token(self, dtype_bytes: int, *, num_layers: int | None = None,
                           num_kv_heads: int | None = None) -> int:
        """K and V of one token over all layers. num_layers / num_kv_heads: what one device holds when layers
        are split over pipeline stages or KV heads over the tensor axis (jaxinfer.kv_budget, the planner)."""
        layers = self.num_layers if num_layers is None else num_layers
        heads = self.num_kv_heads if num_kv_heads is None else num_kv_heads
        return 2 * layers * heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "") -> "ModelConfig":
        hf = _hoist_rope_parameters(hf)
        archs = hf.get("architectures") or []
        arch = _HF_ARCH.get(archs[0]) if archs else None
        arch = arch or hf.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0] if archs else hf.get('model_type')!r}; "
                f"jaxinfer supports {sorted(_HF_ARCH)}")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "mistral") else None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", 10000.0),
            rope_scaling=_freeze(rope_scaling),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", arch == "qwen2"),
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            architecture=arch,
            name=name or hf.get("_name_or_path", ""),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """Inverse of from_hf_config (used by orbax checkpoints and tests that build HF models)."""
        arch_name = {v: k for k, v in _HF_ARCH.items()}[self.architecture]
        out = {
            "architectures": [arch_name],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "hidden_act": "silu",
        }
        if self.architecture == "llama":
            out["attention_bias"] = self.attention_bias
        if self.sliding_window:
            out["sliding_window"] = self.sliding_window
            out["use_sliding_window"] = True
        return out


def _hoist_rope_parameters(hf: dict) -> dict:
    """transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}` instead of the top-level
    `rope_theta` / `rope_scaling` that from_hf_config reads; without this a non-default theta is lost."""
    rp = hf.get("rope_parameters")
    if not isinstance(rp, dict):
        return hf
    hf = dict(hf)
    if "rope_theta" in rp:
        hf.setdefault("rope_theta", rp["rope_theta"])
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default" and not hf.get("rope_scaling"):
        hf["rope_scaling"] = scaling
    return hf


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


def list_presets() -> list[str]:
    if not os.path.isdir(CONFIGS_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith(".json"))


def load_preset(name: str) -> ModelConfig:
    """Model shapes of real models (configs/models/NAME.json, HF config.json format)."""
    path = os.path.join(CONFIGS_DIR, f"{name}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"unknown model preset {name!r}; known presets: {list_presets()}")
    with open(path) as f:
        return ModelConfig.from_hf_config(json.load(f), name=name)
