"""KServe's v1 and v2 (Open Inference Protocol) bodies, read and answered by the bundle's handlers.

Why the bundle has its own envelope: TorchServe 0.12's `kserve` and `kservev2` envelopes read
only the first request of a batch (upstream #2158, never fixed), put a `{label: p}` dict
inside a BYTES tensor, and cannot read `tritonclient`'s binary-data bodies. Here each request
of a batch is read on its own, each image of a request is answered on its own (a bad image
gets its own error, its neighbours are predicted), and v2 answers are proper tensors.

VisionHandler.handle sends a batch here when any of its requests is a KServe body:
- v1 (`/v1/models/{name}:predict`): `{"instances": ["<base64>" | {"data"|"b64": "<base64>"}, ...]}`
  → `{"predictions": [answer, ...]}`; a bad image's slot holds its error object.
- v2 (`/v2/models/{name}/infer`): one BYTES input of shape [N] (base64 strings in JSON, or raw
  image bytes in tritonclient's binary-data extension) → classifiers answer `labels` BYTES
  [N, k] and `probabilities` FP32 [N, k], other tasks `answer` BYTES [N] (each image's JSON);
  every v2 answer has `error` BYTES [N] ("" where the image was predicted). The outputs the
  request names (all when it names none) come back in JSON, or in the binary-data extension
  where it asks (`binary_data`, `binary_data_output`: tritonclient's default).
A request whose images all fail gets the first image's 4xx and `{"error": message}`.

Importing this module also turns TorchServe's own kserve/kservev2 envelopes (config
`service_envelope=kserve|kservev2`, which KServe's docs ask for) into pass-throughs, so the
handlers see every request of the batch whichever way TorchServe is configured.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from ts.torch_handler.request_envelope import kserve as ts_kserve
from ts.torch_handler.request_envelope import kservev2 as ts_kservev2


def _pass_through(envelope, data, context):
    return envelope._handle_fn(data, context)


for _envelope in (ts_kserve.KServeEnvelope, ts_kservev2.KServev2Envelope):
    _envelope.handle = _pass_through


class KServeError(Exception):
    """A KServe body that cannot be read: answered 400 with `{"error": message}`."""


def parse(row) -> tuple[str, dict, bytes] | None:
    """('v1' | 'v2', the JSON body, the binary tail) of a KServe request; None for other requests."""
    if not isinstance(row, dict):
        return None
    body = row.get("data") if row.get("data") is not None else row.get("body")
    tail = b""
    if isinstance(body, (bytes, bytearray)) and body[:1] == b"{":
        try:  # latin-1 keeps one character per byte, so the JSON's end is a byte offset
            _, end = json.JSONDecoder().raw_decode(bytes(body).decode("latin-1"))
            body, tail = json.loads(bytes(body[:end])), bytes(body[end:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    if isinstance(body, dict) and isinstance(body.get("inputs"), list):
        return "v2", body, tail
    if isinstance(body, dict) and isinstance(body.get("instances"), list):
        return "v1", body, tail
    return None


def is_kserve(data: list) -> bool:
    return any(parse(row) for row in data)


def _v1_images(body: dict) -> list:
    images = []
    for item in body["instances"]:
        if isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), dict):
            item = next(iter(item.values()))  # {"image": {"b64": ...}}
        if isinstance(item, dict):
            item = item.get("data", item.get("b64"))
        images.append(item)
    return images


def _v2_images(body: dict, tail: bytes) -> list:
    offset, images = 0, None
    for tensor in body["inputs"]:
        if not isinstance(tensor, dict):
            raise KServeError('each of "inputs" must be an object with name, datatype, shape and data')
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:  # tritonclient's binary data: each element is a uint32 length + bytes
            chunk, offset, elements = tail[offset : offset + size], offset + size, []
            pos = 0
            while pos + 4 <= len(chunk):
                (n,) = struct.unpack_from("<I", chunk, pos)
                elements.append(chunk[pos + 4 : pos + 4 + n])
                pos += 4 + n
            if pos != len(chunk) or len(chunk) != size:
                raise KServeError(
                    f"input {tensor.get('name')!r}: binary data does not hold length-prefixed BYTES elements"
                )
            tensor = {**tensor, "data": elements}
        if images is None and tensor.get("datatype") == "BYTES":
            data = tensor.get("data")
            while isinstance(data, list) and data and isinstance(data[0], list):
                data = [x for row in data for x in row]
            if not isinstance(data, list):
                raise KServeError(f'input {tensor.get("name")!r} has no "data" list')
            images = data
    if images is None:
        raise KServeError(
            "no BYTES input: send the images as a BYTES tensor of shape [N] "
            "(base64 strings in JSON, or raw bytes as binary data)"
        )
    return images


def _v2_outputs(answers: list, errors: list[str]) -> list[dict]:
    """Classifier answers ({label: p}) as labels/probabilities tensors, others as JSON strings."""

    def tensor(name, datatype, shape, data):
        return {"name": name, "datatype": datatype, "shape": shape, "data": data}

    n = len(answers)
    good = [a for a in answers if a is not None]
    outputs = []
    if good and all(isinstance(a, dict) and all(isinstance(p, float) for p in a.values()) for a in good):
        k = max(len(a) for a in good)
        labels, probs = [], []
        for a in answers:
            items = list((a or {}).items()) + [("", 0.0)] * (k - len(a or {}))
            labels += [str(label) for label, _ in items]
            probs += [p for _, p in items]
        outputs += [tensor("labels", "BYTES", [n, k], labels), tensor("probabilities", "FP32", [n, k], probs)]
    else:
        outputs.append(tensor("answer", "BYTES", [n], ["" if a is None else json.dumps(a) for a in answers]))
    outputs.append(tensor("error", "BYTES", [n], errors))
    return outputs


class _ItemContext:
    """The TorchServe context as the handler sees it for the batch's images, one item each:
    a per-image status is kept here rather than sent for a request index that is not one."""

    def __init__(self, context, owner: list[int]):
        self._context = context
        self.owner = owner  # item index -> the index of the request it came in
        self.status: dict[int, tuple[int, str]] = {}
        ids = getattr(context, "request_ids", None) or {}
        self.request_ids = {i: ids.get(request) for i, request in enumerate(owner)}

    def set_response_status(self, code=200, phrase="", idx=0):
        self.status[idx] = (code, phrase)

    def get_request_header(self, idx: int, key: str):
        return self._context.get_request_header(self.owner[idx], key)

    def __getattr__(self, name):
        return getattr(self._context, name)


def handle(handler, data: list, context) -> list:
    """Answer a batch holding KServe requests (and maybe plain ones): every image of every
    request goes through `handler.handle` as one item, then the answers are regrouped."""
    # (protocol, what answers it, the item slots of its images): ("plain", None, [slot]) for a
    # request that is not KServe's, ("error", message, []) for one that cannot be read, and
    # ("v1" | "v2", its JSON body, slots) for the rest.
    requests: list[tuple[str, Any, list[int]]] = []
    items: list = []
    owner: list[int] = []
    for idx, row in enumerate(data):
        try:
            parsed = parse(row)
            if parsed is None:
                requests.append(("plain", None, [len(items)]))
                items.append(row)
                owner.append(idx)
                continue
            protocol, body, tail = parsed
            images = _v1_images(body) if protocol == "v1" else _v2_images(body, tail)
            if not images:
                raise KServeError("the request holds no images")
        except KServeError as e:
            requests.append(("error", str(e), []))
            continue
        requests.append((protocol, body, list(range(len(items), len(items) + len(images)))))
        items += [{"data": image} for image in images]
        owner += [idx] * len(images)

    item_context = _ItemContext(context, owner)
    answers = handler.handle(items, item_context) if items else []
    out: list = []
    for idx, (protocol, body, slots) in enumerate(requests):
        failed = {i: item_context.status[i] for i in slots if item_context.status.get(i, (200,))[0] >= 400}
        if protocol == "error":
            context.set_response_status(400, body, idx)
            out.append({"error": body})
        elif protocol == "plain":
            if failed:
                context.set_response_status(*failed[slots[0]], idx)
            out.append(answers[slots[0]])
        elif len(failed) == len(slots):  # nothing to answer: the request's error
            code, message = failed[slots[0]]
            context.set_response_status(code, message, idx)
            out.append({"error": message, **{k: v for k, v in answers[slots[0]].items() if k != "message"}})
        elif protocol == "v1":
            out.append({"predictions": [answers[i] for i in slots]})
        else:
            model = (getattr(context, "manifest", None) or {}).get("model", {})
            response: dict[str, Any] = {
                "model_name": model.get("modelName"),
                "model_version": model.get("modelVersion"),
            }
            if body.get("id"):
                response["id"] = body["id"]
            outputs = _v2_outputs(
                [None if i in failed else answers[i] for i in slots],
                [failed[i][1] if i in failed else "" for i in slots],
            )
            try:
                out.append(_v2_response(response, outputs, body, context, idx))
            except KServeError as e:
                context.set_response_status(400, str(e), idx)
                out.append({"error": str(e)})
    return out


def _v2_response(response: dict, outputs: list[dict], body: dict, context, idx: int):
    """The v2 answer with the outputs the request asks for (all when it names none), each in
    JSON or, where asked (`binary_data` per output, `binary_data_output` for all: tritonclient
    asks for all when it names none), in the binary-data extension: after the JSON header,
    whose length goes in the Inference-Header-Content-Length header."""
    everything = bool((body.get("parameters") or {}).get("binary_data_output", False))
    asked = body.get("outputs")
    if asked is None:
        asked = [{"name": o["name"]} for o in outputs]
    if not isinstance(asked, list) or not all(isinstance(a, dict) for a in asked):
        raise KServeError('"outputs" must be a list of objects with a name')
    by_name = {o["name"]: o for o in outputs}
    if unknown := [a.get("name") for a in asked if a.get("name") not in by_name]:
        raise KServeError(f"no output named {unknown[0]!r} (outputs: {', '.join(by_name)})")
    chosen, tail = [], b""
    for a in asked:
        tensor = by_name[a["name"]]
        if (a.get("parameters") or {}).get("binary_data", everything):
            if tensor["datatype"] == "FP32":
                raw = np.asarray(tensor["data"], dtype="<f4").tobytes()
            else:  # BYTES: each element a little-endian uint32 length, then its UTF-8 bytes
                raw = b"".join(struct.pack("<I", len(b)) + b for b in (str(x).encode() for x in tensor["data"]))
            tensor = {k: v for k, v in tensor.items() if k != "data"} | {"parameters": {"binary_data_size": len(raw)}}
            tail += raw
        chosen.append(tensor)
    response = {**response, "outputs": chosen}
    if not tail:
        return response
    header = json.dumps(response).encode()
    context.set_response_header(idx, "Inference-Header-Content-Length", str(len(header)))
    context.set_response_content_type(idx, "application/octet-stream")
    return header + tail
