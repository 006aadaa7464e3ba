"""benchmarks/serve.py's transport floor: the same gRPC stack (grpc.aio), no decoding, no
inference; its Predict answers each benchmark payload with a canned reply
(`serve.py --floor-server`)."""

from __future__ import annotations

import numpy as np
from serve_load import GPU_SCENARIOS, SCENARIOS, payload


def canned_replies() -> dict[int, bytes]:
    """Request size in bytes -> a valid serialised reply for that request's batch."""
    from convserve.serving.codec import predict_response

    replies = {}
    for batch in {s.batch for s in SCENARIOS + GPU_SCENARIOS}:
        reply = predict_response(1, [str(i) for i in range(10)],
                                 np.full((batch, 10), 0.1, dtype=np.float32), 0).SerializeToString()
        for dtype in ("float32", "uint8"):
            replies[len(payload(batch, dtype))] = reply
    return replies


async def floor_server() -> None:
    import grpc

    from convserve.server.config import LISTENING_PREFIX

    replies = canned_replies()

    async def predict(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if len(request) not in replies:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a benchmark payload")
        return replies[len(request)]

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "convserve.v1.Inference", {"Predict": grpc.unary_unary_rpc_method_handler(predict)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"{LISTENING_PREFIX}127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()
