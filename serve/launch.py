"""`python -m serve.launch` (also `jaxinfer serve`): the gRPC and OpenAI HTTP servers over one AsyncEngine.

    python -m serve.launch --model=smollm2-135m --grpc_port=50051 --http_port=8000 --warmup=decode

Start-up: the listeners come up first (health NOT_SERVING, HTTP /health 503), then the weights load and the
step buckets compile (`--warmup`), then one short request runs end to end, and only then does health turn
SERVING. The time to ready is logged and exported (`jaxinfer_startup_seconds{phase}`) split into loading,
compiling and warm-up.

Shutdown on SIGTERM / SIGINT: health NOT_SERVING and new requests refused (UNAVAILABLE / 503) at once;
in-flight requests get `--shutdown_grace_s` to finish and are then aborted (their streams end with finish
reason "abort"); the listeners close, the engine stops, the KV pool's state is logged, and the exit code is 0.
A second signal aborts the in-flight requests at once.

Engine flags are EngineArgs' fields (`jaxinfer/engine_args.py`; `--help` lists them). Keep `--api_key` off
shared command lines with `--flagfile`.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from absl import app, flags, logging

from jaxinfer import engine_args as _engine_args
from jaxinfer.engine_args import define_absl_flags, engine_args_from_absl

define_absl_flags()
flags.adopt_module_key_flags(_engine_args)  # --help lists the engine flags too
flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0 or :: listens on every interface)")
flags.DEFINE_integer("grpc_port", 50051, "gRPC port (0: any free port; -1: no gRPC listener)", lower_bound=-1)
flags.DEFINE_integer("http_port", 8000, "OpenAI-compatible HTTP port (0: any free port; -1: no HTTP listener)",
                     lower_bound=-1)
flags.DEFINE_string("ready_file", None, "once serving, write {\"pid\", \"host\", \"grpc_port\", \"http_port\"} "
                    "as JSON here (atomically): how a parent process learns the ports chosen with port 0")
flags.DEFINE_string("api_key", None, "when set, every RPC but gRPC health and every HTTP route needs "
                    "'authorization: Bearer <key>'")
flags.DEFINE_string("tls_cert_file", None, "PEM certificate chain: serve both protocols over TLS")
flags.DEFINE_string("tls_key_file", None, "PEM private key of --tls_cert_file")
flags.DEFINE_float("shutdown_grace_s", 30.0, "on SIGTERM, how long in-flight requests may run before they are "
                   "aborted", lower_bound=0.0)
flags.DEFINE_string("served_model_name", None, "model name in the APIs (default: --model)")
flags.DEFINE_enum("warmup", "full", ["full", "decode", "none"],
                  "what to compile before serving: every token bucket (minutes on a CPU the first time), only "
                  "the buckets of decode steps (prefill chunks compile on first use), or nothing")
flags.DEFINE_integer("max_request_bytes", 4 << 20, "largest HTTP body / gRPC message (413 / RESOURCE_EXHAUSTED)",
                     lower_bound=1024)
FLAGS = flags.FLAGS


def warmup_buckets(buckets: tuple[int, ...], max_num_seqs: int, mode: str) -> list[int]:
    """The token buckets `--warmup=mode` compiles: all, those decode-only steps use (up to the bucket that holds
    max_num_seqs rows), or none."""
    if mode == "none":
        return []
    if mode == "full":
        return list(buckets)
    decode_top = next((b for b in buckets if b >= max_num_seqs), buckets[-1])
    return [b for b in buckets if b <= decode_top]


async def _start_engine(state, engine_args, mode: str, stop: asyncio.Event):
    """Load, compile and warm up; attach the engine to `state`. Returns the AsyncEngine, or None when a signal
    came during start-up (checked between phases: loading and compiling cannot be interrupted)."""
    import jax  # the engine's heavy imports wait until the flags are parsed
    import numpy as np

    from jaxinfer.async_engine import AsyncEngine
    from jaxinfer.engine import LLMEngine
    from jaxinfer.sampling_params import SamplingParams
    from serve.service import Phase

    times = {}
    start = time.perf_counter()
    logging.info("loading %s", engine_args.model)
    engine = await asyncio.to_thread(LLMEngine, engine_args)
    times["loading"] = time.perf_counter() - start
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(engine.runner.params))
    snapshot = engine.stats.snapshot()
    logging.info("weights loaded: %s, %.1fM parameters, in %.1f s", engine.config.architecture, num_params / 1e6,
                 times["loading"])
    logging.info("KV cache: %d blocks x %d tokens = %d tokens; context length %d", snapshot.kv_blocks_total,
                 engine_args.block_size, snapshot.kv_blocks_total * engine_args.block_size, engine.max_model_len)
    state.metrics.startup_seconds.labels("loading").set(times["loading"])
    if stop.is_set():
        return None
    await state.set_phase(Phase.WARMING_UP)
    buckets = warmup_buckets(engine.runner.buckets, engine_args.max_num_seqs, mode)
    start = time.perf_counter()
    if mode == "full" and engine_args.background_warmup:
        # Ready once the smallest and largest buckets are; the rest load on a thread while serving.
        seconds = await asyncio.to_thread(engine.warmup)
        logging.info("warm-up: smallest and largest token buckets ready in %.1f s; %d more load in the background",
                     seconds, max(0, len(buckets) - 2))
        buckets = []
    for i, b in enumerate(buckets):
        if stop.is_set():
            return None
        seconds = await asyncio.to_thread(engine.warmup, None, [b])
        logging.info("warm-up %d/%d: token bucket %d ready in %.1f s", i + 1, len(buckets), b, seconds)
    times["compiling"] = time.perf_counter() - start
    state.metrics.startup_seconds.labels("compiling").set(times["compiling"])
    async_engine = AsyncEngine(engine=engine)
    state.attach(async_engine)
    start = time.perf_counter()
    if mode != "none":  # one request through the whole path: engine thread, streams, detokenizer
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        async for _ in async_engine.generate([engine.tokenizer.bos_token_id or 1] if engine.tokenizer else [1],
                                             params, "warmup"):
            pass
    times["warmup"] = time.perf_counter() - start
    state.metrics.startup_seconds.labels("warmup").set(times["warmup"])
    logging.info("ready in %.1f s (loading %.1f s, compiling %.1f s, warm-up %.1f s; --warmup=%s)",
                 sum(times.values()), times["loading"], times["compiling"], times["warmup"], mode)
    return async_engine


async def serve(engine_args, *, host: str, grpc_port: int | None, http_port: int | None, api_key: str | None,
                tls_cert_file: str | None, tls_key_file: str | None, shutdown_grace_s: float,
                served_model_name: str, warmup: str, max_request_bytes: int, ready_file: str | None = None) -> int:
    from serve.server import ListenConfig, Servers
    from serve.service import Phase, ServerState

    state = ServerState(served_model_name, api_key=api_key)
    servers = Servers(state, ListenConfig(host, grpc_port, http_port, tls_cert_file, tls_key_file,
                                          max_request_bytes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = []

    def on_signal(signum):
        if stop.is_set():  # second signal: no more grace
            logging.warning("%s again: aborting in-flight requests now", signal.Signals(signum).name)
            loop.create_task(state.abort_all())
            return
        logging.info("%s: draining (up to %.1f s for %d in-flight requests)", signal.Signals(signum).name,
                     shutdown_grace_s, state.num_inflight)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
        signals.append(signum)
    engine = None
    try:
        await servers.start()
        scheme = "TLS" if tls_cert_file else "plaintext"
        if servers.grpc_port:
            logging.info("gRPC listening on %s:%d (%s)", host, servers.grpc_port, scheme)
        if servers.http_port:
            logging.info("HTTP listening on %s:%d (%s)", host, servers.http_port, scheme)
        engine = await _start_engine(state, engine_args, warmup, stop)
        if engine is not None and not stop.is_set():
            await state.set_phase(Phase.SERVING)
            logging.info("serving %s", served_model_name)
            if ready_file:
                _write_ready_file(ready_file, host, servers.grpc_port, servers.http_port)
            await stop.wait()
        if engine is not None:
            aborted = await state.drain(shutdown_grace_s)
            logging.info("drained: %d request(s) aborted after the grace period", aborted)
    finally:
        await state.set_phase(Phase.STOPPED)
        await servers.stop()
        if engine is not None:
            state.detach()
            engine.shutdown()
            s = engine.stats.snapshot()
            logging.info("KV pool at exit: %d of %d blocks in use, %d running, %d waiting", s.kv_blocks_used,
                         s.kv_blocks_total, s.num_running, s.num_waiting)
        for signum in signals:
            loop.remove_signal_handler(signum)
    return 0


def _write_ready_file(path: str, host: str, grpc_port: int | None, http_port: int | None) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "host": host, "grpc_port": grpc_port, "http_port": http_port}, f)
    os.replace(tmp, path)  # a reader never sees half a file


def _port(flag: int) -> int | None:
    return None if flag < 0 else flag


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    engine_args = engine_args_from_absl()
    return asyncio.run(serve(
        engine_args, host=FLAGS.host, grpc_port=_port(FLAGS.grpc_port), http_port=_port(FLAGS.http_port),
        api_key=FLAGS.api_key, tls_cert_file=FLAGS.tls_cert_file, tls_key_file=FLAGS.tls_key_file,
        shutdown_grace_s=FLAGS.shutdown_grace_s, served_model_name=FLAGS.served_model_name or engine_args.model,
        warmup=FLAGS.warmup, max_request_bytes=FLAGS.max_request_bytes, ready_file=FLAGS.ready_file))


if __name__ == "__main__":
    app.run(main)
