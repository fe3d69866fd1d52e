"""gRPC stubs for TorchServe's inference API, compiled from the .proto files its own jar carries
(`ts/frontend/model-server.jar`: proto/inference.proto with the google/rpc imports), so the
clients of the tests speak exactly the protocol of the pinned frontend, with nothing vendored.

    stubs = inference_stubs(tmp_path)
    channel = grpc.insecure_channel("127.0.0.1:7070")
    request = stubs.pb2.PredictionsRequest(model_name="digits", input={"data": image_bytes})
    answer = stubs.service(channel).Predictions(request, metadata=[("authorization", "Bearer KEY")])
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import grpc_tools
from grpc_tools import protoc


def frontend_jar() -> Path:
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def inference_stubs(out: Path) -> SimpleNamespace:
    """Compile inference.proto into `out` and import it: `.pb2` (messages) and `.service(channel)`."""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(frontend_jar()) as jar:
        for name in jar.namelist():
            if name == "inference.proto" or (name.startswith("google/rpc/") and name.endswith(".proto")):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(jar.read(name))
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/empty.proto
    args = ["protoc", f"-I{out}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*args, str(out / "inference.proto"), str(out / "google/rpc/status.proto")]) != 0:
        raise RuntimeError(f"protoc could not compile the inference.proto of {frontend_jar()}")
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("inference_pb2")
        grpc_pb2 = importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return SimpleNamespace(pb2=pb2, service=grpc_pb2.InferenceAPIsServiceStub)
