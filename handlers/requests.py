"""The one request parser every handler reads its requests with, and the 4xx it answers with.

A request reaches a handler as TorchServe's row: raw bytes, multipart fields or a JSON body.
`parse_request` reads any of them into a `Request` (its payload and the task's options);
`RequestError` is a bad request's status code and JSON body. Predictions
(handlers/vision.py) and explanations (handlers/explain.py) both read requests here, so
neither needs the other to parse one.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from model_defs.preprocessing import ImageDecodeError, ImageTooLargeError


class RequestError(Exception):
    """A problem with one request's input: answered with `code` and a JSON body."""

    def __init__(self, code: int, type_: str, message: str):
        super().__init__(message)
        self.code, self.type, self.message = code, type_, message

    def body(self) -> dict:
        return {"code": self.code, "type": self.type, "message": self.message}


@dataclass(frozen=True)
class Request:
    """One request as every task reads it: its body and the task's option fields (`parse_request`)."""

    payload: Any  # image bytes, text, a JSON object (dict), or None when the request has no body
    field: str | None  # where the payload came from: "data", "body", a multipart field's name, or None
    options: dict = dataclasses.field(default_factory=dict)  # the task's options found, as sent

    def image_bytes(self, max_bytes: int | None = None) -> bytes:
        """The image bytes: the raw body, a multipart file, or a JSON body's base64 "data".

        `max_bytes` bounds the image's size (413 beyond it, with a JSON body, unlike the bare
        413 TorchServe's frontend gives for a body over its own, higher, max_request_size).
        """
        payload, field = self.payload, self.field
        if payload is None:
            raise RequestError(
                400, "EmptyBody", 'request has no body: send image bytes, a multipart file or JSON {"data": base64}'
            )
        if isinstance(payload, dict):
            if "data" not in payload:
                raise RequestError(
                    400, "InvalidJSON", 'JSON body has no "data" field (expected {"data": "<base64 image>"})'
                )
            payload = payload["data"]
            if not isinstance(payload, str):
                raise RequestError(400, "InvalidJSON", 'JSON field "data" must be a base64 string')
        elif isinstance(payload, str):
            # TorchServe hands a text/* body over as a string: base64 is accepted, anything else is text.
            try:
                payload = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(
                    400,
                    "InvalidImage",
                    "request body is text, not an image: send the image bytes "
                    '(e.g. Content-Type: image/png), a multipart file or JSON {"data": base64}',
                ) from None
        if isinstance(payload, str):
            try:
                payload = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, "InvalidBase64", '"data" is not valid base64') from None
        if not isinstance(payload, (bytes, bytearray)):
            raise RequestError(400, "InvalidRequest", f"unsupported request payload of type {type(payload).__name__}")
        if len(payload) == 0:
            where = "request body" if field in ("body", None) else f'multipart field "{field}"'
            raise RequestError(400, "EmptyBody", f"image data is empty: {where} has 0 bytes")
        if max_bytes is not None and len(payload) > max_bytes:
            raise RequestError(
                413,
                "PayloadTooLarge",
                f"image data is {len(payload):,} bytes, over the limit of max_bytes={max_bytes:,}",
            )
        return bytes(payload)


def parse_request(row: object, options: tuple[str, ...] = (), expect: str | None = None) -> Request:
    """The one reading of a request, for every task: where its body is, the body as JSON when it
    is JSON (it starts with '{'), and the options named `options` found as multipart fields or
    JSON fields beside "data". (TorchServe 0.12 does not pass the URL query parameters of
    /predictions and /explanations on.)

    `expect`, for tasks whose request is a JSON object rather than an image, describes that
    object: the body is then always read as JSON, and one that is not an object is a 400 naming it.
    """
    if not isinstance(row, dict):
        if expect:
            raise RequestError(400, "InvalidRequest", f"expected a JSON object {expect}")
        raise RequestError(400, "InvalidRequest", "request carries no fields")
    found = {k: row[k] for k in options if k in row}
    row = {k: v for k, v in row.items() if k not in options}
    field: str | None = "data" if row.get("data") is not None else "body"
    payload = row.get(field)
    if payload is None and not expect:
        # A multipart form whose file field has another name ("file", "image", ...).
        field, payload = next(((k, v) for k, v in row.items() if isinstance(v, (bytes, bytearray))), (None, None))
    if isinstance(payload, (bytes, bytearray)) and (expect or payload[:1] == b"{"):
        try:
            payload = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            message = f"body is not JSON; send {expect}" if expect else "body starts with '{' but is not valid JSON"
            raise RequestError(400, "InvalidJSON", message) from None
    if expect and not isinstance(payload, dict):
        raise RequestError(400, "InvalidRequest", f"expected a JSON object {expect}")
    if isinstance(payload, dict):
        found.update({k: payload[k] for k in options if k in payload})
    return Request(payload, field, found)


def extract_image_bytes(row: object, max_bytes: int | None = None) -> bytes:
    """The image bytes of one request (raw body, a multipart field, or JSON {"data": base64})."""
    return parse_request(row).image_bytes(max_bytes)


def image_error(e: ImageDecodeError) -> RequestError:
    """An image that cannot be decoded, or is too large, as the request's 4xx."""
    if isinstance(e, ImageTooLargeError):
        return RequestError(413, "ImageTooLarge", str(e))
    return RequestError(400, "InvalidImage", str(e))


FORM_ENCODED = "application/x-www-form-urlencoded"


def form_encoded_error(context, idx: int, result: Any) -> Any:
    """A request with no body that was sent form-encoded: `curl --data-binary @photo.jpg URL`
    without a Content-Type, whose bytes the frontend read as form fields. It is answered 415
    naming the fix, rather than "no body" (any other result is returned as it is)."""
    if not (isinstance(result, RequestError) and result.type == "EmptyBody"):
        return result
    header = getattr(context, "get_request_header", None)
    types = [header(idx, name) for name in ("Content-Type", "content-type")] if header else []
    if not any(str(t or "").lower().startswith(FORM_ENCODED) for t in types):
        return result
    return RequestError(
        415,
        "FormEncodedBody",
        f"the body was sent as {FORM_ENCODED} (curl --data-binary without a Content-Type), so it was "
        "read as form fields, not as an image: send it with -H 'Content-Type: image/jpeg' (the image's "
        "type), or with curl -T FILE, or as a multipart file with curl -F data=@FILE",
    )
