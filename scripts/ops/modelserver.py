"""KServe's ModelServer as a second engine for the bundle's archives (`scripts/serve start --engine kserve`).

TorchServe 0.12 is the last TorchServe; KServe's Python ModelServer is maintained and speaks
the Open Inference Protocol. This engine serves the same catalogued `.mar` files with it, in
one Python process and no Java:
- each archive is unpacked into the run folder and its handler (the bundle's own class, the
  archive's code checked equal to the bundle's) runs in `handlers.worker.Worker`, TorchServe's
  worker part played in-process: the same context, model-config and per-item status codes;
- each version gets the archive's worker count and a dynamic batcher (scripts/ops/batcher.py)
  with the archive's batchSize and maxBatchDelay, since ModelServer batches nothing itself;
- KServe's ModelServer answers health, readiness, model metadata, /metrics and v2 gRPC
  (`ModelInfer` reaches `ArchiveModel.predict`); the REST inference routes are the bundle's,
  because ModelServer 0.21 turns a binary-data BYTES input into UTF-8 text and refuses image
  bytes, and ignores the version of `/v2/models/NAME/versions/V/infer`. They read the bodies
  with the handlers' own envelope (handlers/kserve_protocol.py), so each answer is the one TorchServe
  gives for the same archive: v1 (`/v1/models/NAME:predict`), v2 JSON and binary data,
  TorchServe's `/predictions/NAME[/VERSION]` and `/ping`;
- the handler metrics reach /metrics under TorchServe's names and labels (and the frontend's
  ts_inference_requests_total and queue/inference latency counters), so monitoring/rules.yml
  and the dashboard read them unchanged;
- everything listens where config.properties says (loopback by default: inference_address for
  HTTP, grpc_inference_address/port for gRPC), and every route but /metrics needs the token
  written to key_file.json, as TorchServe does (`disable_token_authorization=true` turns it off).

`ModelServerEngine` starts and stops that process from a run folder, like `TorchServe`;
`python -m scripts.ops.modelserver RUN_DIR` is the process itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
import yaml

from scripts.ops.names import atomic_write, check_name
from scripts.ops.serve import ROOT, ServeError, TorchServe, archive_manifest, port_is_free

ENGINE = "kserve"
ENGINE_FILE = "engine"  # in the run folder while this engine serves from it
PLAN_FILE = "modelserver_plan.json"  # what the process is to serve, written by ModelServerEngine.start
STARTED_FILE = "modelserver_started.json"  # what it serves and what it refused, written by the process
PID_FILE = "modelserver.pid"
LOG_FILE = "modelserver.log"
CODE_PACKAGES = ("handlers", "model_defs")  # the bundle's code every archive carries
NOT_HERE = (
    "the kserve engine serves the versions scripts/serve start loaded and has no management API: "
    "stop it (scripts/serve stop) and start it again with --models, or serve with TorchServe "
    "(scripts/serve start --engine torchserve) to {what}"
)


def engine_of(run_dir: Path) -> str:
    """The engine serving from `run_dir` ("torchserve" unless this engine marked it)."""
    try:
        return (Path(run_dir) / ENGINE_FILE).read_text().strip() or "torchserve"
    except OSError:
        return "torchserve"


# -- the run folder's side: start, stop, status -------------------------------------------------


class ModelServerEngine(TorchServe):
    """The ModelServer process of one run folder, with TorchServe's run folder, config,
    catalog checks, serving record and key file; versions change only by a restart."""

    def _address(self, key: str, default_port: int) -> tuple[str, int]:
        if key == "grpc_inference":
            return self.props.get("grpc_inference_address", "127.0.0.1"), int(
                self.props.get("grpc_inference_port", default_port)
            )
        url = urlparse(self.props["inference_address"])
        return url.hostname or "127.0.0.1", url.port or default_port

    def url(self, api: str = "inference") -> str:
        return self.props["inference_address"].rstrip("/")  # one HTTP port: inference, metadata, /metrics

    def listen_ports(self) -> dict[str, tuple[str, int]]:
        return {"inference": self._address("inference", 8080), "grpc_inference": self._address("grpc_inference", 7070)}

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tmp" / PID_FILE

    def _owns(self, cmdline: list[str]) -> bool:
        """This module's server process for this run folder."""
        return "scripts.ops.modelserver" in cmdline and str(self.run_dir) in cmdline

    def stale_pid_note(self) -> str:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return ""
        return "" if self._is_ours(pid) else f" (its pid file names pid {pid}, not this run folder's ModelServer)"

    def started(self) -> dict:
        try:
            return json.loads((self.run_dir / STARTED_FILE).read_text())
        except (OSError, ValueError):
            return {"served": [], "defaults": {}, "refused": [], "info": {}}

    def models(self) -> list[str]:
        return sorted({name for name, _ in self.started()["served"]})

    def versions(self, name: str) -> list[dict]:
        """Each served version of `name`, in the fields of TorchServe's describe-model answer."""
        started = self.started()
        return [
            {
                "modelName": n,
                "modelVersion": v,
                "modelUrl": info["file"],
                "minWorkers": info["workers"],
                "maxWorkers": info["workers"],
                "batchSize": info["batch_size"],
                "maxBatchDelay": info["max_batch_delay"],
                "workers": [{"id": str(i), "status": "READY", "pid": self.pid()} for i in range(info["workers"])],
                "default": started["defaults"].get(n) == v,
            }
            for n, v, info in ((n, v, started["info"][f"{n}/{v}"]) for n, v in started["served"])
            if n == check_name(name)
        ]

    def describe(self, name: str) -> list[dict]:
        return [v for v in self.versions(name) if v["default"]]

    def start(
        self,
        models: list[str] | None = None,
        timeout: float = 180,
        *,
        everything: bool = False,
        foreground: bool = False,
    ) -> list[str]:
        """Start ModelServer with what this run folder served before plus `models` (as
        `TorchServe.start`: each version checked against the catalog); returns the refusals.
        With `foreground`, this process becomes the server (a container's main process: logs
        on stdout, SIGTERM stops it) and start returns only if it cannot exec."""
        for name in models or []:
            check_name(name)
        if self.is_running():
            raise ServeError(f"ModelServer is already running from {self.run_dir} (pid {self.pid()}); stop it first")
        if TorchServe(self.run_dir, self.model_store, self.config_path).is_running():
            raise ServeError(f"TorchServe is running from {self.run_dir}; stop it first with scripts/serve stop")
        for api, (host, port) in self.listen_ports().items():
            if not port_is_free(host, port):
                raise ServeError(f"port {port} on {host} ({api}) is already in use; stop what holds it")
        plan, refused, saved, _ = self.plan(models, everything=everything)
        versions = []
        for name, version, file, info in plan:
            try:
                declared = archive_manifest(self.model_store / file)
            except ServeError as e:
                refused.append(f"{name} {version or '(' + file + ')'}: {e}")
                continue
            if version is not None and declared["version"] != version:
                refused.append(f"{name} {version}: {file} declares version {declared['version']}; refusing it")
                continue
            workers = info["min_workers"] if info else declared["min_workers"]
            versions.append({"name": name, "version": declared["version"], "file": file, "workers": workers})
        self._make_run_dir()
        self._write_config()  # the run folder's ports, for stop, status and key
        token = self.props.get("disable_token_authorization", "false").lower() != "true"
        if token:
            keys = {kind: {"key": secrets.token_urlsafe(24)} for kind in ("inference", "management", "API")}
            atomic_write(self.key_file, (json.dumps(keys, indent=2) + "\n").encode())
        (self.run_dir / STARTED_FILE).unlink(missing_ok=True)
        (host, port), (grpc_host, grpc_port) = self.listen_ports().values()
        metrics_config = self.props.get("metrics_config")
        plan_body = {
            "host": host,
            "port": port,
            "grpc_host": grpc_host,
            "grpc_port": grpc_port,
            "token": token,
            "metrics_config": metrics_config and str((ROOT / metrics_config).resolve()),
            "model_store": str(self.model_store),
            "versions": versions,
            "defaults": {name: m["default"] for name, m in saved.items()},
            "queue_size": int(self.props.get("job_queue_size", 100)),
            "max_request_size": int(self.props.get("max_request_size", 6_553_500)),
        }
        atomic_write(self.run_dir / PLAN_FILE, (json.dumps(plan_body, indent=2) + "\n").encode())
        atomic_write(self.run_dir / ENGINE_FILE, f"{ENGINE}\n".encode())
        log = self.run_dir / "logs" / LOG_FILE
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if foreground:
            for line in refused:
                print(f"refused: {line}", file=sys.stderr, flush=True)
            atomic_write(self.pid_file, f"{os.getpid()}\n".encode())  # exec keeps the pid
            os.chdir(self.run_dir)
            os.umask(0o077)
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, "-m", "scripts.ops.modelserver", str(self.run_dir)], env)
        with open(log, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)) as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.ops.modelserver", str(self.run_dir)],
                cwd=self.run_dir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the command that started it
                umask=0o077,
            )
        atomic_write(self.pid_file, f"{proc.pid}\n".encode())
        self._wait_started(proc, timeout)
        started = self.started()
        served = {tuple(x) for x in started["served"]}
        with self.state.editing() as state:
            for v in versions:
                restored = v["version"] in saved.get(v["name"], {}).get("versions", {})
                if restored or (v["name"], v["version"]) not in served:
                    continue  # the record changes only for what this start added
                model = state["models"].setdefault(
                    v["name"], {"versions": {}, "default": started["defaults"][v["name"]], "previous_defaults": []}
                )
                info = archive_manifest(self.model_store / v["file"])
                model["versions"][v["version"]] = {
                    "file": v["file"],
                    "min_workers": v["workers"],
                    "max_workers": max(v["workers"], info["max_workers"]),
                }
        refused += started["refused"]
        atomic_write(self.refused_file, (json.dumps(refused, indent=2) + "\n").encode())
        return refused

    def _wait_started(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise ServeError(
                    f"ModelServer exited during start-up (exit {proc.returncode}); see "
                    f"{self.run_dir / 'logs' / LOG_FILE}\n{self.log_tail(LOG_FILE)}"
                )
            if (self.run_dir / STARTED_FILE).is_file():
                try:
                    r = requests.get(self.url() + "/v2/health/ready", headers=self.headers(), timeout=5)
                    if r.status_code == 200:
                        return
                except requests.ConnectionError:
                    pass
            time.sleep(0.3)
        proc.terminate()  # no half-started server left behind
        raise ServeError(f"ModelServer not ready after {timeout:.0f}s; see {self.run_dir / 'logs' / LOG_FILE}")

    def stop(self, timeout: float = 60) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline and self._is_ours(pid):
            time.sleep(0.2)
        if self._is_ours(pid):
            os.kill(pid, signal.SIGKILL)
        # The main thread is a zombie before the process's last thread has closed its sockets:
        # done when the ports are free, so that a start right after this one finds them so.
        while time.time() < deadline and not all(port_is_free(h, p) for h, p in self.listen_ports().values()):
            time.sleep(0.1)
        (self.run_dir / ENGINE_FILE).unlink(missing_ok=True)
        return True

    # -- what only TorchServe's management API does ----------------------------------------

    def register(self, *args, **kwargs) -> str:
        raise ServeError(NOT_HERE.format(what="register a version while serving"))

    def set_default(self, *args, **kwargs) -> None:
        raise ServeError(NOT_HERE.format(what="promote a version while serving"))

    def rollback(self, *args, **kwargs) -> tuple[str, str]:
        raise ServeError(NOT_HERE.format(what="roll back while serving"))

    def scale(self, *args, **kwargs) -> None:
        raise ServeError(NOT_HERE.format(what="scale a version while serving"))

    def unregister(self, *args, **kwargs) -> None:
        raise ServeError(NOT_HERE.format(what="unregister a version while serving"))

    def refresh_key(self, kind: str) -> str:
        raise ServeError("the kserve engine writes new keys at each start: restart it to replace them")


# -- the serving process ------------------------------------------------------------------------


def code_difference(model_dir: Path, handler_file: str) -> str | None:
    """The first of the archive's code files that differs from the bundle's, or None."""
    pairs = [(model_dir / handler_file, ROOT / "handlers" / handler_file)]
    for package in CODE_PACKAGES:
        pairs += [(f, ROOT / f.relative_to(model_dir)) for f in sorted((model_dir / package).rglob("*.py"))]
    for inside_archive, bundle in pairs:
        if not bundle.is_file() or bundle.read_bytes() != inside_archive.read_bytes():
            return str(inside_archive.relative_to(model_dir))
    return None


class MetricLines(logging.Handler):
    """The handlers' `[METRICS]` lines (handlers/metrics.py) as Prometheus series, named and
    labelled as TorchServe's frontend exports them (a Hostname label added)."""

    def __init__(self):
        super().__init__()
        self.series: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        for line in record.getMessage().splitlines():
            if line.startswith("[METRICS]"):
                try:
                    self.observe(line[len("[METRICS]") :])
                except (ValueError, KeyError):
                    logging.getLogger(__name__).warning("unreadable metric line: %s", line)

    def observe(self, line: str) -> None:
        import prometheus_client

        head, dims, kind, host = line.split("|#")[:4]
        name_unit, value = head.rsplit(":", 1)
        name = name_unit.rsplit(".", 1)[0]
        labels = dict(d.split(":", 1) for d in dims.split(",") if d)
        labels["Hostname"] = host.split(":", 1)[1].rsplit(",", 1)[0]
        metric = self.series.get(name)
        if metric is None:
            kind = kind.split(":", 1)[1]
            factory = {"COUNTER": prometheus_client.Counter, "HISTOGRAM": prometheus_client.Histogram}.get(
                kind, prometheus_client.Gauge
            )
            metric = self.series[name] = factory(name, f"{name} (bundle handler metric)", list(labels))
        series = metric.labels(**labels)
        if isinstance(metric, prometheus_client.Counter):
            series.inc(float(value))
        elif isinstance(metric, prometheus_client.Histogram):
            series.observe(float(value))
        else:
            series.set(float(value))


class FrontendMetrics:
    """The counters TorchServe's frontend keeps per request (monitoring/metrics.yaml ts_metrics)."""

    def __init__(self):
        import prometheus_client

        labels = ["model_name", "model_version", "hostname"]
        self.host = socket.gethostname()
        self.requests = prometheus_client.Counter("ts_inference_requests_total", "requests answered", labels)
        # Sums that only grow, under TorchServe's names, which have no _total (a Counter would add it).
        self.latency = prometheus_client.Gauge(
            "ts_inference_latency_microseconds", "request latency, microseconds, summed", labels
        )
        self.queue = prometheus_client.Gauge(
            "ts_queue_latency_microseconds", "queue wait, microseconds, summed", labels
        )

    def record(self, name: str, version: str | None, seconds: float, queued: float) -> None:
        labels = (name, version or "default", self.host)
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).inc(seconds * 1e6)
        self.queue.labels(*labels).inc(queued * 1e6)


def serve(run_dir: Path) -> None:
    """The ModelServer process: load every planned version, then serve until SIGTERM."""
    plan = json.loads((run_dir / PLAN_FILE).read_text())
    sys.argv = sys.argv[:1]  # kserve.model_server reads sys.argv with its own parser when imported
    import prometheus_client
    from kserve.model_server import ModelServer, app

    from scripts.ops.batcher import Batcher
    from scripts.ops.modelserver_app import ArchiveModel, add_routes, run_servers

    # ModelServer configures logging when it is made: before the handlers' loggers are set.
    server = ModelServer(
        http_port=plan["port"], grpc_port=plan["grpc_port"], enable_latency_logging=False, enable_docs_url=False
    )
    prometheus_client.disable_created_metrics()
    lines = logging.getLogger("handlers.metrics.lines")
    lines.addHandler(MetricLines())
    lines.setLevel(logging.INFO)
    lines.propagate = False  # into /metrics, not the log
    logging.getLogger("handlers").setLevel(logging.INFO)
    metrics_cache = None
    if plan["metrics_config"]:
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        metrics_cache = MetricsCacheYamlImpl(plan["metrics_config"])
        metrics_cache.initialize_cache()

    models: dict[str, ArchiveModel] = {}
    refused = []
    for v in plan["versions"]:
        try:
            served = load_version(run_dir, Path(plan["model_store"]), v, metrics_cache)
        except Exception as e:  # noqa: BLE001 - one version that cannot load is refused, the rest served
            logging.getLogger(__name__).exception("%s %s could not be loaded", v["name"], v["version"])
            refused.append(f"{v['name']} {v['version']}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        served.batcher = Batcher(
            [w.handle for w in served.workers],
            int(served.config.get("batchSize", 1)),
            int(served.config.get("maxBatchDelay", 100)) / 1000,
            plan["queue_size"],
        )
        models.setdefault(v["name"], ArchiveModel(v["name"])).add(served)
    for name, model in models.items():
        model.default = plan["defaults"].get(name) if plan["defaults"].get(name) in model.versions else None
        model.default = model.default or next(iter(model.versions))
    started = {
        "served": [[n, v] for n, m in models.items() for v in m.versions],
        "defaults": {n: m.default for n, m in models.items()},
        "refused": refused,
        "info": {
            f"{n}/{v}": {
                "file": served.file,
                "workers": len(served.workers),
                "batch_size": int(served.config.get("batchSize", 1)),
                "max_batch_delay": int(served.config.get("maxBatchDelay", 100)),
            }
            for n, m in models.items()
            for v, served in m.versions.items()
        },
    }
    token = None
    if plan["token"]:
        token = json.loads((run_dir / "key_file.json").read_text())["inference"]["key"]
    for model in models.values():
        server.register_model(model)
    add_routes(app, models, token, FrontendMetrics(), plan.get("max_request_size", 6_553_500))
    atomic_write(run_dir / STARTED_FILE, (json.dumps(started, indent=2) + "\n").encode())
    asyncio.run(run_servers(server, models, plan, token))


def load_version(run_dir: Path, store: Path, v: dict, metrics_cache) -> Any:
    """Unpack one archive, check its code is the bundle's, and start its workers."""
    from handlers.worker import Worker
    from scripts.ops.modelserver_app import ServedVersion

    model_dir = run_dir / "models" / v["name"] / v["version"]
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    with zipfile.ZipFile(store / v["file"]) as z:
        z.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config_file = model_dir / "model-config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    handler_file = manifest["model"]["handler"]
    different = code_difference(model_dir, handler_file)
    if different:
        raise ServeError(
            f"{v['file']} carries {different}, which differs from this bundle's: it was built by another "
            "version of the bundle; rebuild it with scripts/archive or serve it with TorchServe"
        )
    workers = [Worker(v["name"], model_dir, manifest, config, metrics_cache) for _ in range(max(1, v["workers"]))]
    return ServedVersion(v["name"], v["version"], v["file"], config, workers)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    serve(Path(sys.argv[1]).resolve())
