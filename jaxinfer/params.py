"""What each model parameter is: one declaration per weight, read by the model, the loaders, quantization and
the sharding rules.

A `ParamSpec` gives a parameter's place in the weight pytree, its shape in jaxinfer's layout (linear weights
`[in, out]`, so `y = x @ w`), the logical axis of every dimension, and its name and layout in HF checkpoints.
Sharding rules map logical axes to mesh axes, so changing the mesh never touches the model; quantization packs
LINEAR and HEAD parameters and keeps their logical axes (see `jaxinfer.quantization`).

Logical axes:
  vocab     the vocabulary
  embed     the hidden size (residual stream)
  q_heads   query heads x head_dim, flattened (the q projection's output, the o projection's input)
  kv_heads  key/value heads x head_dim, flattened
  mlp       the MLP's intermediate size
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Iterator

from jaxinfer.config import ModelConfig

VOCAB, EMBED, Q_HEADS, KV_HEADS, MLP = "vocab", "embed", "q_heads", "kv_heads", "mlp"


class Kind(enum.Enum):
    LINEAR = "linear"  # a layer's projection: may be packed (quantized)
    HEAD = "head"      # token embedding / LM head: kept at the engine's head dtype; may be packed
    NORM = "norm"      # RMSNorm scale: initialised to ones
    BIAS = "bias"      # projection bias (Qwen2): initialised to zeros


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple[str, ...]    # keys in the weight pytree, e.g. ("layers_3", "wq")
    shape: tuple[int, ...]   # in jaxinfer's layout
    axes: tuple[str, ...]    # one logical axis per dimension
    hf_name: str             # the tensor's name in an HF checkpoint
    kind: Kind
    hf_transposed: bool = False  # the HF tensor is this one transposed (HF linear weights are [out, in])

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def key(self) -> str:
        """'layers_3/wq': the path as one string (checkpoint metadata, logs)."""
        return "/".join(self.path)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.hf_transposed else self.shape

    @property
    def packable(self) -> bool:
        return self.kind in (Kind.LINEAR, Kind.HEAD) and len(self.shape) == 2


def _linear(layer: int, name: str, hf: str, shape, axes) -> ParamSpec:
    return ParamSpec((f"layers_{layer}", name), tuple(shape), axes, f"model.layers.{layer}.{hf}.weight",
                     Kind.LINEAR, hf_transposed=True)


def layer_specs(config: ModelConfig, layer: int) -> tuple[ParamSpec, ...]:
    """The parameters of decoder layer `layer`, in the order the model uses them."""
    c, i = config, layer
    d, q, kv, m = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    prefix = f"model.layers.{i}."
    specs = [ParamSpec((f"layers_{i}", "attn_norm"), (d,), (EMBED,), prefix + "input_layernorm.weight", Kind.NORM),
             _linear(i, "wq", "self_attn.q_proj", (d, q), (EMBED, Q_HEADS)),
             _linear(i, "wk", "self_attn.k_proj", (d, kv), (EMBED, KV_HEADS)),
             _linear(i, "wv", "self_attn.v_proj", (d, kv), (EMBED, KV_HEADS))]
    if c.attention_bias:
        specs += [ParamSpec((f"layers_{i}", f"b{p}"), (n,), (axis,), f"{prefix}self_attn.{p}_proj.bias", Kind.BIAS)
                  for p, n, axis in (("q", q, Q_HEADS), ("k", kv, KV_HEADS), ("v", kv, KV_HEADS))]
    specs += [_linear(i, "wo", "self_attn.o_proj", (q, d), (Q_HEADS, EMBED)),
              ParamSpec((f"layers_{i}", "mlp_norm"), (d,), (EMBED,), prefix + "post_attention_layernorm.weight",
                        Kind.NORM),
              _linear(i, "w_gate", "mlp.gate_proj", (d, m), (EMBED, MLP)),
              _linear(i, "w_up", "mlp.up_proj", (d, m), (EMBED, MLP)),
              _linear(i, "w_down", "mlp.down_proj", (m, d), (MLP, EMBED))]
    return tuple(specs)


def global_specs(config: ModelConfig) -> tuple[ParamSpec, ...]:
    """Embedding, final norm and LM head. A tied model keeps one `[hidden, vocab]` matrix, `lm_head`, made from
    the HF embedding: XLA CPU runs a bf16 dot ~10x slower on a transposed operand, while the token lookup
    gathers the step's few columns cheaply (model.py)."""
    c = config
    norm = ParamSpec(("final_norm",), (c.hidden_size,), (EMBED,), "model.norm.weight", Kind.NORM)
    if c.tie_word_embeddings:
        return (ParamSpec(("lm_head",), (c.hidden_size, c.vocab_size), (EMBED, VOCAB), "model.embed_tokens.weight",
                          Kind.HEAD, hf_transposed=True), norm)
    return (ParamSpec(("embed",), (c.vocab_size, c.hidden_size), (VOCAB, EMBED), "model.embed_tokens.weight",
                      Kind.HEAD),
            norm,
            ParamSpec(("lm_head",), (c.hidden_size, c.vocab_size), (EMBED, VOCAB), "lm_head.weight", Kind.HEAD,
                      hf_transposed=True))


def model_specs(config: ModelConfig) -> tuple[ParamSpec, ...]:
    """Every parameter of the model: the global ones, then layer after layer."""
    return global_specs(config) + tuple(s for i in range(config.num_layers) for s in layer_specs(config, i))


def spec_by_key(config: ModelConfig) -> dict[str, ParamSpec]:
    return {s.key: s for s in model_specs(config)}


def iter_leaves(params, specs) -> Iterator[tuple[ParamSpec, object]]:
    """(spec, value) for every declared parameter present in `params` (a nested dict)."""
    for spec in specs:
        node = params
        for k in spec.path:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            yield spec, node


def set_leaf(params: dict, spec: ParamSpec, value) -> None:
    node = params
    for k in spec.path[:-1]:
        node = node.setdefault(k, {})
    node[spec.path[-1]] = value
