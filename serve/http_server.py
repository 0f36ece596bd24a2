"""The OpenAI-compatible HTTP server (FastAPI on uvicorn), over the same ServerState as the gRPC server.

Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming and
`stream_options.include_usage`), GET /v1/models, GET /health, GET /metrics, POST /tokenize, POST /detokenize.

- Every route needs `Authorization: Bearer <key>` when the server has an API key (an ASGI middleware, before
  routing: /health and /metrics too; health checkers send the header).
- The body is read up to `max_body_bytes` (413 past it, from Content-Length or while reading a chunked body)
  before anything parses it; invalid UTF-8 or JSON is a 400. Errors are OpenAI-shaped:
  `{"error": {"message", "type", "param", "code"}}`.
- A streaming response starts only once the first tokens are there, so admission refusals are a 429 status,
  not an error event. A client that disconnects (streaming or not) cancels its request in the engine.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxinfer.errors import InvalidRequestError
from serve import openai_protocol as api
from serve.service import (ErrorInfo, NotFoundError, RequestTooLargeError, ServerState, UnauthenticatedError,
                           classify, new_request_id)

_DONE = object()


def error_response(info: ErrorInfo) -> JSONResponse:
    return JSONResponse({"error": {"message": info.message, "type": info.type, "param": info.param,
                                   "code": info.code}}, status_code=info.http_status)


class _ApiKeyMiddleware:
    """401 for any HTTP request without the API key (pure ASGI: nothing is routed or read before it)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.state.api_key is not None:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.state.authorized(header):
                response = error_response(classify(UnauthenticatedError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'")))
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_json(request: Request, max_body_bytes: int):
    """The decoded JSON body, refusing (413) a body over the limit before reading or parsing more of it."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
        raise RequestTooLargeError(f"the request body is larger than {max_body_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise RequestTooLargeError(f"the request body is larger than {max_body_bytes} bytes")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError("body", f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError("body", f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequestError("body", "the request body nests too deeply") from None
    _check_strings(data)
    return data


def _check_strings(value, depth: int = 0) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError("body", "the request body has a string with a lone surrogate") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


class ClientDisconnected(Exception):
    pass


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it clean up (abort) before we answer
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _merge(streams):
    """(prompt index, RequestOutput) from several engine streams as they come; closing this closes them all."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001  (re-raised in the consumer)
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _DONE))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is _DONE:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Completion:
    """One OpenAI completions or chat request in flight: its engine streams and how to shape its replies."""

    def __init__(self, state: ServerState, body, chat: bool):
        self.state, self.body, self.chat = state, body, chat
        self.params = body.sampling_params()
        self.id = new_request_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = state.served_model_name
        prompts = [body.conversation()] if chat else body.prompts()
        self.n = self.params.n
        add_gen = body.add_generation_prompt if chat else True
        # Validate every prompt before any of them reaches the engine.
        self.requests = [state.prepare(p, self.params, f"{self.id}-{i}", add_generation_prompt=add_gen)
                         for i, p in enumerate(prompts)]
        self.offsets: dict[int, int] = {}  # completions logprobs: text offset per choice
        self.finish: str | None = None

    def streams(self):
        return _merge([self.state.stream(r) for r in self.requests])

    def _logprobs(self, o, token_ids, choice: int):
        if self.params.logprobs is None:
            return None
        entries = o.logprobs[len(o.token_ids) - len(token_ids):]
        if self.chat:
            return api.chat_logprobs(self.state.token_text, token_ids, entries, self.params.logprobs)
        shaped, self.offsets[choice] = api.completion_logprobs(self.state.token_text, token_ids, entries,
                                                               self.params.logprobs, self.offsets.get(choice, 0))
        return shaped

    def _usage(self, finals) -> dict:
        return api.usage(sum(len(r.prompt_token_ids) for r in self.requests),
                         sum(len(o.token_ids) for out in finals for o in out.outputs))

    async def collect(self) -> dict:
        finals = [None] * len(self.requests)
        async for i, out in self.streams():
            finals[i] = out
        choices = []
        for i, out in enumerate(finals):
            for o in out.outputs:
                index = i * self.n + o.index
                choice = {"index": index, "logprobs": self._logprobs(o, o.token_ids, index),
                          "finish_reason": o.finish_reason}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": o.text}
                else:
                    choice["text"] = o.text
                choices.append(choice)
        self.finish = finals[0].outputs[0].finish_reason
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self._usage(finals)}

    def chunk(self, choices, usage=None) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.body.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def chunks(self, i: int, out, reported: set[int]):
        """The SSE chunks of one RequestOutput: one per choice with news."""
        for o in out.outputs:
            index = i * self.n + o.index
            newly_finished = o.finish_reason is not None and index not in reported
            if not o.delta_token_ids and not o.delta_text and not newly_finished:
                continue
            if newly_finished:
                reported.add(index)
            choice = {"index": index, "logprobs": self._logprobs(o, o.delta_token_ids, index),
                      "finish_reason": o.finish_reason if newly_finished else None}
            if self.chat:
                choice["delta"] = {"content": o.delta_text}
            else:
                choice["text"] = o.delta_text
            yield self.chunk([choice])

    async def sse(self, streams, first):
        """The event stream, from the first (prompt index, output) on; ends with usage (when asked) and [DONE]."""
        reported: set[int] = set()
        finals, status = {}, 499  # unless it ends normally: the client went away
        try:
            if self.chat:  # OpenAI opens each choice with the assistant role
                yield self.chunk([{"index": i * self.n + k, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}
                                  for i in range(len(self.requests)) for k in range(self.n)])
            item = first
            while item is not None:
                i, out = item
                finals[i] = out
                for chunk in self.chunks(i, out, reported):
                    yield chunk
                item = await anext(streams, None)
            self.finish = finals[0].outputs[0].finish_reason if 0 in finals else None
            if self.body.include_usage:
                yield self.chunk([], self._usage(finals.values()))
            status = 200
        except Exception as e:  # noqa: BLE001  (the status line is sent: report it as an event)
            info = classify(e)
            status = info.http_status
            yield f"data: {json.dumps({'error': {'message': info.message, 'type': info.type}})}\n\n"
        finally:
            await streams.aclose()
            self.state.metrics.record_outcome("http", status, self.finish)
        yield "data: [DONE]\n\n"


def build_http_app(state: ServerState, *, max_body_bytes: int = 4 << 20) -> FastAPI:
    app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_ApiKeyMiddleware, state=state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 / 405 from routing, OpenAI-shaped
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ErrorInfo(exc.status_code, None, kind, f"{request.method} {request.url.path}: "
                                                                     f"{exc.detail}"))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error_response(classify(exc))

    async def body(request: Request, model):
        parsed = api.parse(model, await read_json(request, max_body_bytes))
        if getattr(parsed, "model", None) not in (None, state.served_model_name):
            raise NotFoundError(f"the model {parsed.model!r} does not exist; this server serves "
                                f"{state.served_model_name!r}", param="model", code="model_not_found")
        return parsed

    async def completion(request: Request, chat: bool):
        finish, status, streaming = None, 200, False
        try:
            parsed = await body(request, api.ChatCompletionRequest if chat else api.CompletionRequest)
            req = await asyncio.to_thread(_Completion, state, parsed, chat)  # tokenizing a long prompt
            if not req.body.stream:
                result = await _unless_disconnected(request, req.collect())
                finish = req.finish
                return JSONResponse(result)
            streams = req.streams()
            try:
                first = await _unless_disconnected(request, anext(streams))
            except BaseException:
                await streams.aclose()
                raise
            streaming = True  # the event stream records its own outcome when it ends
            return StreamingResponse(req.sse(streams, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        except ClientDisconnected:
            status = 499  # the client went away (nginx's code for it); nobody reads this response
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001
            info = classify(e)
            status = info.http_status
            return error_response(info)
        finally:
            if not streaming:
                state.metrics.record_outcome("http", status, finish)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.get("/v1/models")
    async def models():
        try:
            info = state.model_info()
        except Exception as e:  # noqa: BLE001
            return error_response(classify(e))
        return {"object": "list", "data": [{"id": info["model"], "object": "model", "created": info["created"],
                                            "owned_by": "jaxinfer", "root": info["model_path"],
                                            "max_model_len": info["context_length"]}]}

    @app.get("/health")
    async def health():
        if not state.serving:
            return error_response(classify(state.unavailable()))
        return {"status": "serving"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            req = await body(request, api.TokenizeRequest)
            if (req.prompt is None) == (req.messages is None):
                raise InvalidRequestError("prompt", "give exactly one of prompt or messages")
            prompt = req.prompt if req.prompt is not None else [m.as_dict() for m in req.messages]
            ids = state.tokenize(prompt, add_special_tokens=req.add_special_tokens,
                                 add_generation_prompt=req.add_generation_prompt)
            return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.engine.max_model_len}
        except Exception as e:  # noqa: BLE001
            return error_response(classify(e))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        try:
            req = await body(request, api.DetokenizeRequest)
            return {"prompt": state.detokenize(req.tokens)}
        except Exception as e:  # noqa: BLE001
            return error_response(classify(e))

    return app
