"""The gRPC server (`grpc.aio`): `jaxinfer.v1.GenerationService`, standard health checking and reflection.

- Generate streams RequestOutputs as GenerateResponses; GenerateUnary answers once. A cancelled RPC (client
  cancel, or its deadline passing) cancels the handler, which closes the engine stream: the request is aborted
  and its KV blocks are freed at the next step.
- Health (`grpc.health.v1.Health`): NOT_SERVING while loading and warming up, SERVING once ready, NOT_SERVING
  from the start of a drain on (for "" and the service name).
- API key (metadata `authorization: Bearer <key>`) on every RPC except health: load balancers and the
  Kubernetes gRPC probe cannot send metadata, and health reveals nothing. Reflection does need the key: it
  describes the API, and a generic client (grpcurl -H, a reflection-based stub) can send it.
"""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxinfer.errors import InvalidRequestError
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from serve.grpc_stubs import SERVICE_NAME, pb, pb_grpc
from serve.service import Phase, ServerState, classify, top_logprobs

HEALTH_SERVICE = "grpc.health.v1.Health"
_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "abort": pb.FINISH_REASON_ABORT}
# SamplingParams fields of the proto message; a test holds them equal to the dataclass's.
SAMPLING_FIELDS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


def sampling_params(message) -> SamplingParams:
    """jaxinfer.SamplingParams from the proto message: unset fields keep their defaults."""
    kwargs = {}
    for field in pb.SamplingParams.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            if value:
                kwargs[field.name] = list(value)
        elif message.HasField(field.name):
            kwargs[field.name] = value
    return SamplingParams(**kwargs)


def _chat(chat) -> tuple[list[dict], bool]:
    if not chat.messages:
        raise InvalidRequestError("messages", "chat.messages must hold at least one message")
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    return messages, chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True


def _prompt(request):
    """(prompt, add_generation_prompt) of a GenerateRequest or TokenizeRequest."""
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return request.text, True
    if kind == "token_ids":
        return list(request.token_ids.ids), True
    if kind == "chat":
        return _chat(request.chat)
    raise InvalidRequestError("prompt", "set one of text, token_ids or chat")


def _logprobs(token_ids, entries, k: int) -> list:
    return [pb.TokenLogprob(token_id=t, logprob=e[t], top=[pb.TopLogprob(token_id=i, logprob=lp)
                                                           for i, lp in top_logprobs(e, k)])
            for t, e in zip(token_ids, entries) if e is not None]


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def Generate(self, request, context):
        finish, status = None, grpc.StatusCode.OK
        try:
            params = sampling_params(request.params)
            prompt, add_generation_prompt = _prompt(request)
            reported: set[int] = set()  # samples whose finish reason was sent
            stream = await asyncio.to_thread(self.state.generate, prompt, params, request.request_id or None,
                                             add_generation_prompt=add_generation_prompt)
            async for out in stream:
                finish = out.outputs[0].finish_reason
                yield _response(out, params, streaming=True, reported=reported)
        except asyncio.CancelledError:
            status = _cancel_status(context)
            raise
        except Exception as e:  # noqa: BLE001  (mapped to its status; never leaves the server broken)
            status = classify(e).grpc_code
            await _abort(context, e)
        finally:
            self.state.metrics.record_outcome("grpc", status.name, finish)

    async def GenerateUnary(self, request, context):
        status, final = grpc.StatusCode.OK, None
        try:
            params = sampling_params(request.params)
            prompt, add_generation_prompt = _prompt(request)
            stream = await asyncio.to_thread(self.state.generate, prompt, params, request.request_id or None,
                                             add_generation_prompt=add_generation_prompt)
            async for final in stream:
                pass
            return _response(final, params, streaming=False)
        except asyncio.CancelledError:
            status = _cancel_status(context)
            raise
        except Exception as e:  # noqa: BLE001
            status = classify(e).grpc_code
            await _abort(context, e)
        finally:
            self.state.metrics.record_outcome("grpc", status.name, final.outputs[0].finish_reason if final else None)

    async def Tokenize(self, request, context):
        try:
            prompt, add_generation_prompt = _prompt(request)
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = self.state.tokenize(prompt, add_special_tokens=special, add_generation_prompt=add_generation_prompt)
            return pb.TokenizeResponse(token_ids=ids, tokens=[self.state.token_text(i) for i in ids])
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)

    async def ModelInfo(self, request, context):
        try:
            info = self.state.model_info()
            info.pop("created")
            return pb.ModelInfoResponse(**info)
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)


def _response(out: RequestOutput, params: SamplingParams, *, streaming: bool, reported: set[int] | None = None):
    completions = []
    for o in out.outputs:
        newly_finished = o.finish_reason is not None and (reported is None or o.index not in reported)
        if streaming and not o.delta_token_ids and not o.delta_text and not newly_finished:
            continue  # nothing new for this sample
        ids, text = (o.delta_token_ids, o.delta_text) if streaming else (o.token_ids, o.text)
        c = pb.Completion(index=o.index, text=text, token_ids=ids)
        if params.logprobs is not None and o.logprobs:
            c.logprobs.extend(_logprobs(ids, o.logprobs[len(o.token_ids) - len(ids):], params.logprobs))
        if newly_finished:
            c.finish_reason = _FINISH[o.finish_reason]
            if isinstance(o.stop_reason, str):
                c.stop_string = o.stop_reason
            elif isinstance(o.stop_reason, int):
                c.stop_token_id = o.stop_reason
            if reported is not None:
                reported.add(o.index)
        completions.append(c)
    response = pb.GenerateResponse(request_id=out.request_id, outputs=completions, finished=out.finished)
    if out.finished:
        generated = sum(len(o.token_ids) for o in out.outputs)
        prompt = len(out.prompt_token_ids)
        response.usage.CopyFrom(pb.Usage(prompt_tokens=prompt, completion_tokens=generated,
                                         total_tokens=prompt + generated))
        if out.prompt_logprobs:
            response.prompt_logprobs.extend(_logprobs(out.prompt_token_ids[1:], out.prompt_logprobs[1:],
                                                      params.prompt_logprobs or 0))
    return response


def _cancel_status(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else \
        grpc.StatusCode.CANCELLED


async def _abort(context, error: BaseException) -> None:
    info = classify(error)
    await context.abort(info.grpc_code, info.message)  # raises: ends the RPC with this status


# ------------------------------------------------------------------------------------ malformed messages

class _Malformed:
    """What a request that fails to parse (bad wire format, a string field with invalid UTF-8) deserializes to,
    so the handler can answer INVALID_ARGUMENT; grpc would otherwise report the parser's exception as UNKNOWN."""

    def __init__(self, error: Exception):
        self.error = error


def _parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # noqa: BLE001  (DecodeError, and whatever a corrupt message provokes)
            return _Malformed(e)
    return parse


def _checked(method, streaming: bool):
    def message(request):
        return f"malformed request message: {request.error}"

    if streaming:
        async def handle_stream(request, context):
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message(request))
            async for response in method(request, context):
                yield response
        return handle_stream

    async def handle(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message(request))
        return await method(request, context)
    return handle


def _service_handler(servicer: GenerationServicer):
    """The service's method handlers, read from the .proto's descriptor (as the generated
    add_..._to_server does), with request parsers that turn a malformed message into INVALID_ARGUMENT."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["GenerationService"].methods:
        assert not m.client_streaming, "no client-streaming RPCs in v1"
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(_checked(getattr(servicer, m.name), m.server_streaming),
                                request_deserializer=_parser(getattr(pb, m.input_type.name)),
                                response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# --------------------------------------------------------------------------------------------- API key

class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every RPC but health unless the metadata carries `authorization: Bearer <key>`."""

    def __init__(self, state: ServerState):
        self.state = state

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self.state.authorized(metadata.get("authorization")):
            return handler
        return _denied(handler)


def _denied(handler):
    message = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as a streaming handler must be)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[kind](deny_stream if kind[1] else deny, request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)


# ---------------------------------------------------------------------------------------------- server

def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(state: ServerState, host: str, port: int, *, tls: tuple[bytes, bytes] | None = None,
                            max_message_bytes: int = 4 << 20) -> tuple[grpc.aio.Server, int]:
    """Start serving on host:port (0: any free port); returns the server and its port. `tls`: (key PEM, cert
    PEM). Health follows the state's phase."""
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(state)] if state.api_key else None,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.so_reuseport", 0)])  # a port in use is an error, not a silently shared port
    server.add_generic_rpc_handlers((_service_handler(GenerationServicer(state)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME], server)

    async def follow_phase(phase: Phase) -> None:
        if phase in (Phase.DRAINING, Phase.STOPPED):
            await health_servicer.enter_graceful_shutdown()  # NOT_SERVING for good
            return
        status = health_pb2.HealthCheckResponse.SERVING if phase is Phase.SERVING else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, status)

    await follow_phase(state.phase)
    state.add_phase_listener(follow_phase)
    address = _address(host, port)
    if tls is not None:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    return server, bound
