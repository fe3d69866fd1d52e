"""The kserve side of the ModelServer engine (scripts/ops/modelserver.py): the model KServe's
ModelServer registers, the REST inference routes, the token check and the two servers bound
where config.properties says. Kept apart so that `scripts/serve status` imports no web stack."""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from grpc import aio
from kserve import Model
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, MAX_GRPC_MESSAGE_LENGTH
from kserve.errors import InferenceError, InvalidInput, ServerNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer

from handlers.worker import Answer, Worker
from handlers.worker import Request as WorkerRequest
from scripts.ops.batcher import Batcher, QueueFull

AUTH_FAILED = "Token Authorization failed: send the inference key as 'Authorization: Bearer KEY' (scripts/serve key)"


def error_answer(code: int, type_: str, message: str) -> Answer:
    return Answer(code, json.dumps({"code": code, "type": type_, "message": message}).encode(), {})


@dataclass
class ServedVersion:
    """One model version: its model-config, its workers and its batcher."""

    name: str
    version: str
    file: str
    config: dict
    workers: list[Worker]
    batcher: Batcher | None = field(default=None)

    @property
    def handler(self) -> Any:
        return self.workers[0].handler

    async def answer(self, request: WorkerRequest) -> tuple[Answer, float]:
        """The handler's answer and the seconds the request waited; 503 when the queue is full."""
        assert self.batcher is not None
        try:
            return await self.batcher.submit(request)
        except QueueFull as e:
            return error_answer(503, "ServiceUnavailableException", str(e)), 0.0


class ArchiveModel(Model):
    """One model name as KServe's ModelServer sees it: every version served, and the default.
    ModelServer calls `predict` for v2 gRPC's ModelInfer (the version is the request's)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.versions: dict[str, ServedVersion] = {}
        self.default: str | None = None
        self.metrics: Any = None
        self.ready = True

    def add(self, served: ServedVersion) -> None:
        self.versions[served.version] = served

    def version(self, version: str | None) -> ServedVersion | None:
        return self.versions.get(version or self.default or "")

    def get_input_types(self) -> list[dict]:
        return [{"name": "images", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        handler = self.versions[self.default or next(iter(self.versions))].handler
        meta = getattr(handler, "meta", {})
        if meta.get("task") == "classification":
            k = len(handler.classes) if getattr(handler, "multi_label", False) else handler.topk
            outputs = [
                {"name": "labels", "datatype": "BYTES", "shape": [-1, k]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            ]
        else:
            outputs = [{"name": "answer", "datatype": "BYTES", "shape": [-1]}]
        return [*outputs, {"name": "error", "datatype": "BYTES", "shape": [-1]}]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        served = self.version(payload.model_version or None)
        if served is None:
            raise InvalidInput(f"model {self.name} has no version {payload.model_version!r}")
        inputs = []
        for tensor in payload.inputs:
            data = tensor.as_numpy().ravel().tolist() if tensor.datatype == "BYTES" else tensor.data
            inputs.append({"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape, "data": data})
        body: dict[str, Any] = {"inputs": inputs}
        if payload.id:
            body["id"] = payload.id
        if payload.request_outputs:
            body["outputs"] = [{"name": o.name} for o in payload.request_outputs]
        start = time.perf_counter()
        request = WorkerRequest(body, "", dict(headers or {}), payload.id or str(uuid.uuid4()))
        answer, queued = await served.answer(request)
        if self.metrics:
            self.metrics.record(self.name, payload.model_version or None, time.perf_counter() - start, queued)
        reply = answer.json()
        if answer.status == 503:
            raise ServerNotReady(reply.get("message"))
        if answer.status >= 500:
            raise InferenceError(reply.get("message") or reply.get("error"))
        if answer.status >= 400:
            raise InvalidInput(reply.get("error") or reply.get("message"))
        outputs = [InferOutput(o["name"], o["shape"], o["datatype"], o["data"]) for o in reply["outputs"]]
        return InferResponse(
            payload.id or "",
            self.name,
            outputs,
            model_version=served.version,
            use_binary_outputs=payload.use_binary_outputs,
        )


async def read_body(request: Request, max_bytes: int) -> bytes | None:
    """The request's body, or None past `max_bytes` (config.properties' max_request_size)."""
    if int(request.headers.get("content-length") or 0) > max_bytes:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def add_routes(
    app: FastAPI, models: dict[str, ArchiveModel], token: str | None, metrics, max_bytes: int = 6_553_500
) -> None:
    """The REST inference routes (before KServe's own, so these answer) and the token check."""
    for model in models.values():
        model.metrics = metrics

    def served_or_404(name: str, version: str | None) -> ServedVersion | Response:
        model = models.get(name)
        if model is None:
            return JSONResponse(
                {"code": 404, "type": "ModelNotFoundException", "message": f"Model not found: {name}"}, 404
            )
        served = model.version(version)
        if served is None:
            message = f"Model version {version} does not exist for model {name} (versions: {', '.join(model.versions)})"
            return JSONResponse({"code": 404, "type": "ModelVersionNotFoundException", "message": message}, 404)
        return served

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        served = served_or_404(name, version)
        if isinstance(served, Response):
            return served
        start = time.perf_counter()
        headers = dict(request.headers)
        body = await read_body(request, max_bytes)
        if body is None:
            message = f"request body is over the server's max_request_size of {max_bytes:,} bytes"
            return JSONResponse({"code": 413, "type": "RequestTooLarge", "message": message}, 413)
        worker_request = WorkerRequest(
            body,
            headers.get("content-type", ""),
            headers,
            headers.get("x-request-id") or str(uuid.uuid4()),
        )
        answer, queued = await served.answer(worker_request)
        metrics.record(name, version, time.perf_counter() - start, queued)
        extra = {k: v for k, v in answer.headers.items() if k not in ("content-type", "content-length")}
        return Response(answer.body, answer.status, extra, media_type=answer.content_type)

    async def version_metadata(name: str, version: str) -> Response:
        served = served_or_404(name, version)
        if isinstance(served, Response):
            return served
        model = models[name]
        body = {
            "name": name,
            "versions": list(model.versions),
            "platform": "",
            "inputs": model.get_input_types(),
            "outputs": model.get_output_types(),
        }
        return JSONResponse(body)

    async def version_ready(name: str, version: str) -> Response:
        served = served_or_404(name, version)
        return served if isinstance(served, Response) else JSONResponse({"name": name, "ready": True})

    async def ping() -> Response:
        return JSONResponse({"status": "Healthy"})

    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/predictions/{name}", infer, methods=["POST", "PUT"])
    app.add_api_route("/predictions/{name}/{version}", infer, methods=["POST", "PUT"])
    app.add_api_route("/v1/models/{name}:predict", infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/versions/{version}", version_metadata, methods=["GET"])
    app.add_api_route("/v2/models/{name}/versions/{version}/ready", version_ready, methods=["GET"])

    if token is not None:
        expected = f"Bearer {token}".encode()

        @app.middleware("http")
        async def check_token(request: Request, call_next):
            if request.url.path != "/metrics" and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), expected
            ):
                return JSONResponse({"code": 401, "type": "Unauthorized", "message": AUTH_FAILED}, 401)
            return await call_next(request)


class TokenInterceptor(aio.ServerInterceptor):
    """gRPC calls need the same key, as `authorization: Bearer KEY` metadata."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self.expected):
            return await continuation(handler_call_details)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_FAILED)

        return grpc.unary_unary_rpc_method_handler(refuse)


class BoundGRPCServer(GRPCServer):
    """KServe's gRPC server on the configured address (KServe's binds every interface)."""

    def __init__(self, host: str, token: str | None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.host, self.token = host, token

    async def start(self, max_workers):
        from concurrent import futures

        interceptors: list = [ExceptionToStatusInterceptor()]
        if self.token is not None:
            interceptors.insert(0, TokenInterceptor(self.token))
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_LENGTH),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_LENGTH),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._server.add_insecure_port(f"{host}:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


async def run_servers(server, models: dict[str, ArchiveModel], plan: dict, token: str | None) -> None:
    """ModelServer's REST and gRPC servers on the planned addresses, and every version's batcher."""
    for model in models.values():
        for served in model.versions.values():
            assert served.batcher is not None
            served.batcher.start()
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, plan["port"])
    rest.config.host = plan["host"]
    grpc_server = BoundGRPCServer(
        plan["grpc_host"], token, plan["grpc_port"], server.dataplane, server.model_repository_extension, kwargs={}
    )
    # uvicorn handles SIGTERM and SIGINT while it serves and raises the signal again once it
    # has stopped: the handler below takes that second one, so the gRPC server and the
    # batchers stop too and the process exits 0 (a container's clean stop).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    grpc_task = asyncio.ensure_future(grpc_server.start(4))
    rest_task = asyncio.ensure_future(rest.start())
    done, _ = await asyncio.wait({rest_task, grpc_task}, return_when=asyncio.FIRST_COMPLETED)
    if grpc_task in done:
        rest._server.should_exit = True
        await rest_task
        grpc_task.result()  # the gRPC server's error, if it stopped for one
    rest_task.result()
    await grpc_server.stop()
    grpc_task.cancel()
    for model in models.values():
        for served in model.versions.values():
            assert served.batcher is not None
            await served.batcher.stop()
