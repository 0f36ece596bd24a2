"""Both listeners (gRPC and HTTP) on one asyncio loop over one ServerState: start them, stop them.

`Servers` is what the launcher (`serve/launch.py`) runs on its own loop. `BackgroundServer` serves an engine
that is already loaded from a thread of its own, for callers that live in the same process (tests, notebooks,
benchmarks):

    with BackgroundServer(llm.engine, grpc_port=0, http_port=0) as server:   # 0: any free port
        server.grpc_target, server.http_url   # "127.0.0.1:PORT", "http://127.0.0.1:PORT"
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading

import uvicorn

from serve.grpc_server import start_grpc_server
from serve.http_server import build_http_app
from serve.service import Phase, ServerState


@dataclasses.dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    grpc_port: int | None = 50051  # None: no gRPC listener; 0: any free port
    http_port: int | None = 8000  # None: no HTTP listener; 0: any free port
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    max_request_bytes: int = 4 << 20  # HTTP body and gRPC message limit

    def __post_init__(self):
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the launcher owns SIGTERM / SIGINT: it drains requests before the listeners stop


class Servers:
    def __init__(self, state: ServerState, config: ListenConfig):
        self.state, self.config = state, config
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._grpc = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None

    async def start(self) -> None:
        c = self.config
        if c.grpc_port is not None:
            tls = None
            if c.tls_cert_file:
                with open(c.tls_key_file, "rb") as key, open(c.tls_cert_file, "rb") as cert:
                    tls = (key.read(), cert.read())
            self._grpc, self.grpc_port = await start_grpc_server(self.state, c.host, c.grpc_port, tls=tls,
                                                                 max_message_bytes=c.max_request_bytes)
            if not self.grpc_port:
                raise OSError(f"gRPC: cannot listen on {c.host}:{c.grpc_port}")
        if c.http_port is not None:
            app = build_http_app(self.state, max_body_bytes=c.max_request_bytes)
            self._http = _Uvicorn(uvicorn.Config(
                app, host=c.host, port=c.http_port, log_config=None, log_level="warning", access_log=False,
                lifespan="off", ssl_certfile=c.tls_cert_file, ssl_keyfile=c.tls_key_file,
                timeout_graceful_shutdown=5))
            self._http_task = asyncio.create_task(self._http.serve())
            for _ in range(1000):  # bounded: 10 s
                if self._http.started or self._http_task.done():
                    break
                await asyncio.sleep(0.01)
            if not self._http.started:
                raise OSError(f"HTTP: cannot listen on {c.host}:{c.http_port}")
            self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    async def stop(self, grace_s: float = 1.0) -> None:
        """Close the listeners (requests should have been drained: `ServerState.drain`)."""
        if self._http is not None:
            self._http.should_exit = True
            try:
                await asyncio.wait_for(self._http_task, timeout=grace_s + 10)
            except (asyncio.TimeoutError, SystemExit):
                logging.warning("HTTP server did not stop in time")
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
            self._grpc = None


class BackgroundServer:
    """gRPC + HTTP over an engine, on an event loop in a daemon thread; serving as soon as the constructor
    returns. `engine`: an LLMEngine (wrapped in an AsyncEngine that `stop` shuts down) or an AsyncEngine (left
    running). `stop(grace_s)` drains as SIGTERM does: refuse new requests, let in-flight ones run `grace_s`,
    abort the rest, close the listeners."""

    def __init__(self, engine, *, served_model_name: str | None = None, api_key: str | None = None,
                 host: str = "127.0.0.1", grpc_port: int | None = 0, http_port: int | None = 0, **listen):
        from jaxinfer.async_engine import AsyncEngine

        self._owns_engine = not isinstance(engine, AsyncEngine)
        self.engine = AsyncEngine(engine=engine) if self._owns_engine else engine
        name = served_model_name or self.engine.engine.args.model
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jaxinfer-server", daemon=True)
        self._thread.start()
        config = ListenConfig(host, grpc_port, http_port, **listen)
        try:
            self.state, self.servers = self._call(self._start(name, api_key, config), timeout=60)
        except BaseException:
            self._close_loop()
            raise
        self.host = host

    async def _start(self, name, api_key, config):
        state = ServerState(name, api_key=api_key)
        servers = Servers(state, config)
        await servers.start()
        state.attach(self.engine)
        await state.set_phase(Phase.SERVING)
        return state, servers

    def _call(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def grpc_target(self) -> str | None:
        return None if self.servers.grpc_port is None else f"{self.host}:{self.servers.grpc_port}"

    @property
    def http_url(self) -> str | None:
        scheme = "https" if self.servers.config.tls_cert_file else "http"
        return None if self.servers.http_port is None else f"{scheme}://{self.host}:{self.servers.http_port}"

    def stop(self, grace_s: float = 0.0) -> int:
        """Drain and close; returns how many requests were aborted after the grace period. Idempotent."""
        if not self._thread.is_alive():
            return 0

        async def shutdown():
            aborted = await self.state.drain(grace_s)
            await self.state.set_phase(Phase.STOPPED)
            await self.servers.stop()
            self.state.detach()
            return aborted

        try:
            return self._call(shutdown(), timeout=grace_s + 60)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        if self._owns_engine:
            self.engine.shutdown()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
