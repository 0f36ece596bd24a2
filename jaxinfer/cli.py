"""`jaxinfer` command line: generate, chat, bench throughput, convert, plan, profile, serve."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from jaxinfer.engine_args import add_argparse_flags, engine_args_from_namespace


def _engine_args(p: argparse.ArgumentParser) -> None:
    add_argparse_flags(p.add_argument_group("engine options (EngineArgs)"))


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(a, **overrides):
    from jaxinfer import LLM

    return LLM(**dataclasses.asdict(engine_args_from_namespace(a, **overrides)))


def _params(a):
    from jaxinfer import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          seed=a.seed)


def _stream_to_terminal(llm, prompt, params) -> str:
    start, first, n = time.perf_counter(), None, 0
    text = ""
    for out in llm.stream(prompt, params):
        first = first or time.perf_counter()
        delta = out.outputs[0].delta_text
        n += len(out.outputs[0].delta_token_ids)
        text += delta
        sys.stdout.write(delta)
        sys.stdout.flush()
    end = time.perf_counter()
    decode = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    print(f"\n[{n} tokens, time to first token {(first or end) - start:.2f}s, {decode:.1f} tok/s decode]",
          file=sys.stderr)
    return text


def cmd_generate(a) -> None:
    from jaxinfer.processor import chat_prompt_ids

    llm = _make_llm(a)
    if llm.tokenizer is None:
        sys.exit(f"jaxinfer generate: model {a.model!r} has no tokenizer")
    prompt = chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": a.prompt}]) if a.chat_template \
        else llm.tokenizer.encode(a.prompt)
    # Compile (or load from the persistent cache) before timing anything, but only the buckets this one request
    # uses: its prefill chunks and single-token decodes.
    chunk = a.max_num_batched_tokens
    llm.warmup([_params(a)], token_counts={min(len(prompt), chunk), len(prompt) % chunk or chunk, 1})
    _stream_to_terminal(llm, prompt, _params(a))


def cmd_chat(a) -> None:
    llm = _make_llm(a)
    llm.warmup([_params(a)])
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("jaxinfer chat: empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply = _stream_to_terminal(llm, messages, _params(a))
        messages.append({"role": "assistant", "content": reply})


def cmd_bench_throughput(a) -> None:
    """Random-token workload (vLLM's `--dataset random` style): prompt and output lengths drawn uniformly."""
    from jaxinfer import SamplingParams

    llm = _make_llm(a)
    print(f"warm-up compile: {llm.warmup([SamplingParams(temperature=0.0)]):.1f}s", file=sys.stderr)
    rng = np.random.default_rng(a.seed or 0)
    vocab = llm.engine.config.vocab_size
    prompts = [rng.integers(100, vocab, rng.integers(a.min_input, a.max_input + 1)).tolist()
               for _ in range(a.num_requests)]
    outs = [int(rng.integers(a.min_output, a.max_output + 1)) for _ in range(a.num_requests)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outs]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    gen = sum(len(r.token_ids) for r in results)
    total = gen + sum(len(p) for p in prompts)
    print(f"| requests | policy | output tok/s | total tok/s | wall s |\n|---|---|---|---|---|\n"
          f"| {a.num_requests} | {a.scheduler_policy} | {gen / elapsed:.1f} | {total / elapsed:.1f} | {elapsed:.1f} |")


def cmd_convert(a) -> None:
    import jax.numpy as jnp

    from jaxinfer.loaders import load_weights
    from jaxinfer.loaders.checkpoint import convert

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[a.dtype or "float32"]
    convert(a.src, a.dst, lambda src: load_weights(src, dtype))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion to the terminal")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat message")
    g.add_argument("prompt")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat")
    _engine_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None)
    c.set_defaults(fn=cmd_chat)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("throughput", help="offline throughput on a random-token workload")
    _engine_args(t)
    t.add_argument("--num-requests", type=int, default=64)
    t.add_argument("--min-input", type=int, default=16)
    t.add_argument("--max-input", type=int, default=128)
    t.add_argument("--min-output", type=int, default=16)
    t.add_argument("--max-output", type=int, default=384)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_bench_throughput)

    v = sub.add_parser("convert", help="convert a checkpoint (GGUF / safetensors) to an orbax checkpoint")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    v.set_defaults(fn=cmd_convert)

    from jaxinfer.planner.cli import add_plan_args, add_profile_args
    from jaxinfer.quantization.cli import add_eval_args, add_quantize_args
    add_plan_args(sub), add_profile_args(sub)
    add_quantize_args(sub), add_eval_args(sub)
    sub.add_parser("serve", add_help=False, help="gRPC + OpenAI HTTP server (serve/launch.py; jaxinfer serve --help)")
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the absl launcher, as `python -m serve.launch` (its flags, its --help)
        import runpy
        sys.argv = ["jaxinfer serve", *argv[1:]]
        return runpy.run_module("serve.launch", run_name="__main__", alter_sys=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"jaxinfer: error: {e}\n")


if __name__ == "__main__":
    main()
