"""The gRPC messages and stubs of `serve/proto/jaxinfer/v1/generation.proto`, compiled at import.

`grpc.protos_and_services` runs grpcio-tools' protoc in-process on the .proto itself (about 0.1 s), so there
are no generated files to go stale or to forget to regenerate, and no build step: whatever the .proto says is
what every server and client in this process speaks. The cost is that grpcio-tools is a runtime dependency
(it is one anyway) and editors see no static stub types.

    from serve.grpc_stubs import pb, pb_grpc
    stub = pb_grpc.GenerationServiceStub(grpc.insecure_channel("127.0.0.1:50051"))
"""
from __future__ import annotations

import os
import sys

import grpc

PROTO = "serve/proto/jaxinfer/v1/generation.proto"  # relative to the directory that holds the serve package
SERVICE_NAME = "jaxinfer.v1.GenerationService"


def _load():
    # protoc resolves the .proto against sys.path; an editable install reaches `serve` through an import hook,
    # not a sys.path entry, so name its parent directory explicitly.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        return grpc.protos_and_services(PROTO)
    finally:
        if added:
            sys.path.remove(root)


pb, pb_grpc = _load()
assert pb.DESCRIPTOR.services_by_name["GenerationService"].full_name == SERVICE_NAME
