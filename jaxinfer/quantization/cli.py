"""The `jaxinfer quantize` and `jaxinfer eval ppl` subcommands (jaxinfer/cli.py registers them).

    jaxinfer quantize --method gptq|awq|rtn --bits 4 --group-size 128 [--act-order] \\
        --calib FILE --num-samples N --seq-len L SRC DST
    jaxinfer eval ppl --model SRC --data FILE --context L --stride S
"""
from __future__ import annotations

import argparse


def add_quantize_args(subparsers) -> argparse.ArgumentParser:
    q = subparsers.add_parser("quantize", help="quantize a float checkpoint to an HF GPTQ / AWQ checkpoint")
    q.add_argument("src", help="registered name, .gguf file, HF dir or orbax checkpoint (loaded in float32)")
    q.add_argument("dst", help="output directory (HF format: safetensors + config.json + tokenizer)")
    q.add_argument("--method", default="gptq", choices=["gptq", "awq", "rtn"])
    q.add_argument("--bits", type=int, default=4, choices=[4, 8])
    q.add_argument("--group-size", type=int, default=128, help="inputs per quantization group; -1: per channel")
    q.add_argument("--act-order", action="store_true", help="GPTQ desc_act: quantize inputs by decreasing "
                                                            "Hessian diagonal")
    q.add_argument("--asym", action="store_true", help="GPTQ / RTN: asymmetric grid (AWQ always is)")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (fraction of the mean diagonal)")
    q.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"])
    q.add_argument("--calib", default=None, help="calibration text file (GPTQ, AWQ)")
    q.add_argument("--num-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(fn=cmd_quantize)
    return q


def cmd_quantize(a) -> None:
    from jaxinfer.quantization.pipeline import QuantizeSettings, quantize_checkpoint

    settings = QuantizeSettings(method=a.method, bits=a.bits, group_size=a.group_size, sym=not a.asym,
                                act_order=a.act_order, percdamp=a.damp, checkpoint_format=a.checkpoint_format,
                                calib=a.calib, num_samples=a.num_samples, seq_len=a.seq_len, seed=a.seed)
    quantize_checkpoint(a.src, a.dst, settings, overwrite=a.overwrite)


def add_eval_args(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval", required=True)
    p = esub.add_parser("ppl", help="perplexity on a text file (HF's sliding-window recipe), through the engine")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True, help="text file, e.g. wikitext-2 test.txt")
    p.add_argument("--context", type=int, default=1024, help="window length in tokens")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts (each window scores "
                                                          "its last `stride` tokens)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    p.add_argument("--weight-dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=[None, "packed", "dequantize", "int8", "int4"],
                   help="as the engine's option: keep packed weights packed, expand them, or quantize on load")
    p.set_defaults(fn=cmd_eval_ppl)
    return p


def cmd_eval_ppl(a) -> None:
    from jaxinfer.evaluate import engine_for_perplexity, perplexity, read_tokens

    llm = engine_for_perplexity(a.model, a.context, weight_dtype=a.weight_dtype, quantization=a.quantization)
    if llm.tokenizer is None:
        raise ValueError(f"model {a.model!r} has no tokenizer to encode {a.data} with")
    ids = read_tokens(llm.tokenizer, a.data, a.max_tokens)
    print(perplexity(llm, ids, a.context, a.stride))
