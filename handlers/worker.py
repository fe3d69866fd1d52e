"""A TorchServe worker's part, played in-process: the bundle's handlers served by another engine.

TorchServe's Python worker builds a `Context` (system properties, the archive's manifest and
model-config, the metrics cache), initializes the archive's handler with it, and for each batch
hands the handler one row per request (the body decoded by its content type) and reads back,
per request, the answer, the status code and the headers the handler set. `Worker` does the
same with TorchServe's own `Context` class, so that the handlers run unchanged (scripts/ops/
modelserver.py serves them with KServe's ModelServer). This module imports no web framework.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ts.context import Context, RequestProcessor
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

PREDICTION_FAILED = "Prediction failed"  # TorchServe's answer to every request of a batch that raised


@dataclass
class Request:
    """One request as the engine received it: the raw body, its content type, its headers."""

    body: bytes
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    request_id: str = ""

    def row(self) -> dict:
        """The row TorchServe's worker gives the handler: JSON and text bodies decoded."""
        body: Any = self.body
        kind = self.content_type.split(";")[0].strip().lower()
        try:
            if kind == "application/json":
                body = json.loads(body)
            elif kind.startswith("text"):
                body = body.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            pass  # TorchServe forwards a body it cannot decode as bytes
        return {"body": body}


@dataclass
class Answer:
    """One request's answer: status, body bytes and the headers the handler set."""

    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type") or (
            "application/json" if self.body[:1] in (b"{", b"[") else "application/octet-stream"
        )

    def json(self) -> Any:
        return json.loads(self.body)


def encode(value: Any) -> bytes:
    """An answer as TorchServe's worker writes it: bytes as they are, text as UTF-8, else JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, indent=2).encode()


def handler_class(handler_file: str) -> type[BaseHandler]:
    """The one BaseHandler subclass of the bundle's handler module named by the archive's
    manifest (e.g. image_classifier.py, the copy of handlers/image_classifier.py)."""
    module = importlib.import_module(f"handlers.{Path(handler_file).stem}")
    found = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and c.__module__ == module.__name__ and issubclass(c, BaseHandler)
    ]
    if len(found) != 1:
        raise ValueError(f"{handler_file} defines {len(found)} handler classes; TorchServe needs exactly one")
    return found[0]


class Worker:
    """One worker of one model version: its handler, initialized once, answering batches."""

    def __init__(self, name: str, model_dir: Path, manifest: dict, config: dict, metrics=None):
        self.name = name
        self.manifest = manifest
        self.context = Context(
            name,
            str(model_dir),
            manifest,
            config.get("batchSize", 1),
            None,  # no GPU id: the handler runs on the CPU unless it is given one
            "0.12.0",
            metrics=metrics,
            model_yaml_config=config,
        )
        self.handler = handler_class(manifest["model"]["handler"])()
        self.handler.initialize(self.context)

    def handle(self, requests: list[Request]) -> list[Answer]:
        """Answer a batch: each request gets its own status; a batch that raises is answered 503
        for every request, as TorchServe does."""
        ctx = self.context
        ctx.request_ids = {i: r.request_id for i, r in enumerate(requests)}
        ctx.request_processor = [RequestProcessor(dict(r.headers)) for r in requests]
        try:
            answers = self.handler.handle([r.row() for r in requests], ctx)
        except Exception:  # noqa: BLE001 - the batch's requests all get TorchServe's 503
            logger.exception("batch of %d failed", len(requests))
            body = {"code": 503, "type": "InternalServerException", "message": PREDICTION_FAILED}
            return [Answer(503, json.dumps(body).encode(), {}) for _ in requests]
        out = []
        for i, value in enumerate(answers):
            code, _ = ctx.get_response_status(i)
            headers = {k.lower(): str(v) for k, v in ctx.get_response_headers(i).items()}
            out.append(Answer(code or 200, encode(value), headers))
        return out
