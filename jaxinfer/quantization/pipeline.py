"""The layer-by-layer quantization driver behind `jaxinfer quantize`: float checkpoint in, every linear weight of
every decoder layer quantized with GPTQ, AWQ or round to nearest, HF-format checkpoint out (hf_format.py).

Calibration activations come from running the model densely on N samples of L tokens (calibration.py), one
decoder layer at a time, so only one layer's activations are held. GPTQ feeds each layer the output of the
layers before it *after* they were quantized, and quantizes a layer's linears in the order the layer uses them
(q/k/v, then o, gate/up, down), each with inputs computed through the ones already quantized (AutoGPTQ's
true-sequential). AWQ, as AutoAWQ, feeds each layer the float output of the previous one.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig
from jaxinfer.params import Kind, layer_specs
from jaxinfer.quantization.awq import awq_layer
from jaxinfer.quantization.calibration import (INPUT_OF, SEQUENTIAL_GROUPS, calibration_samples, embed,
                                               layer_weights, run_layer)
from jaxinfer.quantization.gptq import Hessian, gptq
from jaxinfer.quantization.group_quant import IntWeight, rtn

METHODS = ("gptq", "awq", "rtn")


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    method: str = "gptq"           # gptq | awq | rtn (round to nearest on GPTQ's grid, written as GPTQ)
    bits: int = 4
    group_size: int = 128          # -1: one group per output column
    sym: bool = True               # GPTQ / RTN; AWQ is always asymmetric (zero_point)
    act_order: bool = False        # GPTQ desc_act
    percdamp: float = 0.01         # GPTQ damping, a fraction of the Hessian's mean diagonal
    checkpoint_format: str = "gptq"  # GPTQ / RTN: "gptq" (zero points stored minus one) or "gptq_v2"
    n_grid: int = 20               # AWQ scale and clip grids
    clip: bool = True              # AWQ clip search
    calib: str | None = None       # calibration text file (GPTQ, AWQ)
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {METHODS}")
        if self.method == "awq" and self.bits != 4:
            raise ValueError(f"AWQ checkpoints are 4-bit (GEMM format); --bits {self.bits} is not supported")
        if self.bits not in (4, 8):
            raise ValueError(f"--bits {self.bits} is not supported: 4 or 8")
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"unknown checkpoint_format {self.checkpoint_format!r}: gptq or gptq_v2")
        if self.act_order and self.method != "gptq":
            raise ValueError("--act-order is a GPTQ option")
        if self.method != "rtn" and not self.calib:
            raise ValueError(f"{self.method.upper()} needs calibration text: pass --calib FILE")

    @property
    def min_zero(self) -> int:
        # GPTQ's v1 format stores zero - 1 in `bits` bits: keep asymmetric zero points >= 1 so it holds them.
        return 1 if self.checkpoint_format == "gptq" and not self.sym else 0

    def quantization_config(self) -> dict:
        """The `quantization_config` of config.json, in the names HF transformers, AutoGPTQ and AutoAWQ read."""
        gs = self.group_size
        if self.method == "awq":
            return {"quant_method": "awq", "version": "gemm", "bits": 4, "w_bit": 4, "group_size": gs,
                    "q_group_size": gs, "zero_point": True, "modules_to_not_convert": None}
        return {"quant_method": "gptq", "bits": self.bits, "group_size": gs, "desc_act": self.act_order,
                "sym": self.sym, "damp_percent": self.percdamp, "true_sequential": True, "static_groups": False,
                "checkpoint_format": self.checkpoint_format, "lm_head": False,
                "quantizer": ["jaxinfer-rtn" if self.method == "rtn" else "jaxinfer-gptq"]}


@dataclasses.dataclass
class QuantizedModel:
    config: ModelConfig
    params: dict                  # float weights; each quantized linear holds its dequantized value
    weights: dict[str, IntWeight]  # spec key ('layers_3/wq') -> integer form, for the writer
    settings: QuantizeSettings
    seconds: float = 0.0


def _linear_names(config: ModelConfig, layer: int) -> list[str]:
    return [s.name for s in layer_specs(config, layer) if s.kind == Kind.LINEAR]


def quantize_params(config: ModelConfig, params, settings: QuantizeSettings, samples=None,
                    progress: bool = True) -> QuantizedModel:
    """Quantize every decoder layer's linear weights of float `params` (f32). `samples`: int32 `[N, L]`
    calibration tokens (GPTQ, AWQ). Embeddings, norms and the LM head stay float."""
    start = time.perf_counter()
    s = settings
    if s.method != "rtn" and samples is None:
        raise ValueError(f"{s.method.upper()} needs calibration samples")
    params = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    weights: dict[str, IntWeight] = {}
    x = embed(config, params, samples) if s.method != "rtn" else None
    bar = tqdm(range(config.num_layers), desc=f"{s.method.upper()} int{s.bits} g{s.group_size}", unit="layer",
               disable=not progress or os.environ.get("JAXINFER_QUIET", "") == "1")
    for i in bar:
        w = {k: jnp.asarray(v, jnp.float32) for k, v in layer_weights(params, i).items()}
        if s.method == "rtn":
            quantized = {n: rtn(w[n], s.bits, s.group_size, s.sym, s.min_zero) for n in _linear_names(config, i)}
        elif s.method == "gptq":
            quantized, loss = {}, 0.0
            for group in SEQUENTIAL_GROUPS:
                _, inputs = run_layer(config, w, x, capture=True)
                h = Hessian(w[group[0]].shape[0])
                h.add(getattr(inputs, INPUT_OF[group[0]]))
                del inputs
                for n in group:
                    quantized[n], err = gptq(w[n], h.value, bits=s.bits, group_size=s.group_size, sym=s.sym,
                                             act_order=s.act_order, percdamp=s.percdamp, min_zero=s.min_zero)
                    w[n] = jnp.asarray(quantized[n].dequantize())
                    loss += err
            bar.set_postfix(loss=f"{loss:.3g}")
            x, _ = run_layer(config, w, x)  # the next layer sees this one quantized
        else:
            out, inputs = run_layer(config, w, x, capture=True)
            w, quantized = awq_layer(config, w, inputs, bits=s.bits, group_size=s.group_size, n_grid=s.n_grid,
                                     clip=s.clip)
            x = out  # the next layer sees this one in float
        for n, q in quantized.items():
            w[n] = jnp.asarray(q.dequantize())
            weights[f"layers_{i}/{n}"] = q
        params[f"layers_{i}"] = w
        jax.block_until_ready(w)
    return QuantizedModel(config, params, weights, settings, time.perf_counter() - start)


def quantize_checkpoint(src: str, dst: str, settings: QuantizeSettings, *, overwrite: bool = False,
                        progress: bool = True) -> QuantizedModel:
    """`jaxinfer quantize`: load `src` in f32, calibrate on `settings.calib` with src's tokenizer, quantize and
    write the HF-format checkpoint `dst` (with src's tokenizer)."""
    from jaxinfer.loaders import load_weights
    from jaxinfer.quantization.hf_format import save_quantized
    from jaxinfer.registry import resolve_model
    from jaxinfer.tokenizer import load_tokenizer

    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise ValueError(f"{dst} already exists and is not empty")
    path = resolve_model(src)
    config, params = load_weights(src, jnp.float32, quantization="dequantize", verbose=progress)  # float
    tokenizer = load_tokenizer(path) if not path.startswith("random:") else None
    samples = None
    if settings.method != "rtn":
        if tokenizer is None:
            raise ValueError(f"{src} has no tokenizer to encode the calibration text with")
        samples = calibration_samples(tokenizer, settings.calib, settings.num_samples, settings.seq_len,
                                      settings.seed)
    model = quantize_params(config, params, settings, samples, progress=progress)
    save_quantized(dst, model, tokenizer=tokenizer)
    if progress:
        print(f"[jaxinfer] {settings.method} int{settings.bits} g{settings.group_size}: quantized "
              f"{len(model.weights)} weights in {model.seconds:.1f}s, wrote {dst}", flush=True)
    return model
