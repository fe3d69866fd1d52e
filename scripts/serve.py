"""Start, stop and query TorchServe with the bundle's config.properties.

    scripts/serve start [--models digits,other | all]    # waits until every model is ready
                                                         # (no --models: restore what was served)
    scripts/serve status
    scripts/serve key [inference|management|API]         # the token for curl
    scripts/serve stop

Each server keeps its state in a run folder (default `.serve/`): the effective
config.properties, TorchServe's logs, the pid file and `key_file.json`, the token keys
TorchServe writes at each start (token authorization stays on). Giving each server its
own run folder and ports lets several run side by side, as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_defs.checkpoint import atomic_write_bytes  # noqa: E402
from scripts.catalog import Catalog, CatalogError  # noqa: E402

ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
# TorchServe always starts its gRPC servers too (there is no switch to turn them off).
GRPC_PORT_KEYS = {"grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}


class ServeError(RuntimeError):
    """TorchServe could not be started, stopped or reached; the message says why."""


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def archive_manifest(mar: Path) -> dict:
    """Version and worker counts an archive declares (MAR-INF/MANIFEST.json, model-config.yaml)."""
    try:
        with zipfile.ZipFile(mar) as z:
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
            config = yaml.safe_load(z.read("model-config.yaml")) if "model-config.yaml" in z.namelist() else {}
    except (OSError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise ServeError(f"{mar} is not a readable model archive ({e})") from None
    workers = int(config.get("minWorkers", 1))
    return {"version": manifest["model"]["modelVersion"], "min_workers": workers,
            "max_workers": int(config.get("maxWorkers", workers))}


class ServingState:
    """What a server serves, kept in its run folder so a restart can restore it: per model
    its versions (archive file, workers), its default and the defaults before it."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"models": {}}

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(state, indent=2) + "\n").encode())

    @contextmanager
    def editing(self):
        state = self.load()
        yield state
        self.save(state)


class TorchServe:
    """One TorchServe instance: its config, run folder, ports and token keys."""

    def __init__(self, run_dir: Path | None = None, model_store: Path | None = None,
                 config: Path | None = None, ports: dict[str, int] | None = None):
        self.run_dir = Path(run_dir or ROOT / ".serve").resolve()
        self.config_path = Path(config or ROOT / "config.properties")
        self.props = read_properties(self.config_path)
        store = Path(model_store or self.props.get("model_store", "model_store"))
        self.model_store = (store if store.is_absolute() else ROOT / store).resolve()
        self.state = ServingState(self.run_dir / "serving.json")
        effective = self.run_dir / "config.properties"
        if ports is None and effective.is_file():
            # A server started earlier from this run folder: talk to it on its own ports.
            self.props.update(read_properties(effective))
        if ports is not None:
            # Any port not given is picked free, so a server can run beside another.
            for api in ADDRESS_KEYS:
                self.props[ADDRESS_KEYS[api]] = f"http://127.0.0.1:{ports.get(api) or free_port()}"
            for api in GRPC_PORT_KEYS:
                self.props[GRPC_PORT_KEYS[api]] = str(ports.get(api) or free_port())
            # Workers talk to the frontend over /tmp/.ts.sock.<port>, from 9000 up by default.
            self.props["initial_worker_port"] = str(free_port())

    # -- addresses and keys -------------------------------------------------------------

    def url(self, api: str) -> str:
        return self.props[ADDRESS_KEYS[api]].rstrip("/")

    def listen_ports(self) -> dict[str, tuple[str, int]]:
        """Every (host, port) the server binds: the three HTTP APIs and the two gRPC ones."""
        out = {api: (urlparse(self.url(api)).hostname, urlparse(self.url(api)).port) for api in ADDRESS_KEYS}
        for api, key in GRPC_PORT_KEYS.items():
            out[api] = (self.props.get(f"{api}_address", "127.0.0.1"),
                        int(self.props.get(key, 7070 if api == "grpc_inference" else 7071)))
        return out

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    def key(self, kind: str = "inference") -> str | None:
        """The current token for `kind` (inference, management, API); None when auth is off."""
        if self.props.get("disable_token_authorization", "false").lower() == "true":
            return None
        if not self.key_file.is_file():
            raise ServeError(f"no token keys at {self.key_file}: is TorchServe running from {self.run_dir}?")
        return json.loads(self.key_file.read_text())[kind]["key"]

    def headers(self, kind: str = "inference") -> dict[str, str]:
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # TorchServe keeps its pid file in the temp dir: a private one per run folder keeps
        # servers apart. Logs go to the run folder too.
        env["TMPDIR"] = str(self.run_dir / "tmp")
        env["LOG_LOCATION"] = str(self.run_dir / "logs")
        env["METRICS_LOCATION"] = str(self.run_dir / "logs")
        # Workers must import the bundle's packages and the venv's, whatever the caller's cwd.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    # -- state ----------------------------------------------------------------------------

    def pid(self) -> int | None:
        pid_file = self.run_dir / "tmp" / ".model_server.pid"
        if not pid_file.is_file():
            return None
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def models(self) -> list[str]:
        return [m["modelName"] for m in self.manage("GET", "/models")["models"]]

    def describe(self, name: str) -> list[dict]:
        """GET /models/{name} (the default version) or /models/{name}/{version}."""
        return self.manage("GET", f"/models/{name}")

    # -- start / stop ---------------------------------------------------------------------

    def _write_config(self) -> Path:
        props = dict(self.props)
        props["model_store"] = str(self.model_store)
        props["allowed_urls"] = "file://" + re.escape(str(self.model_store)) + "/.*"
        if props.get("metrics_config"):  # relative to the bundle root, like model_store
            props["metrics_config"] = str((ROOT / props["metrics_config"]).resolve())
        path = self.run_dir / "config.properties"
        lines = [f"# written by scripts/serve from {self.config_path}; edit that file instead"]
        lines += [f"{k}={v}" for k, v in props.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, models: list[str] | None = None, timeout: float = 180) -> None:
        """Start TorchServe and register its models, waiting until each has a ready worker.

        `models` names .mar files in the store (`digits` → digits.mar). Without it, the
        versions, defaults and worker counts recorded in the run folder's serving.json are
        restored, so a restart serves what was served before; with no record either,
        every .mar in the store is served under its file name.
        """
        if shutil.which("java") is None:
            raise ServeError("Java 17 was not found on PATH; TorchServe's frontend needs it. "
                             "Run scripts/setup.sh (installs openjdk-17-jre-headless) or install Java 17.")
        if self.is_running():
            raise ServeError(f"TorchServe is already running from {self.run_dir} (pid {self.pid()}); "
                             "stop it first with scripts/serve stop")
        for api, (host, port) in self.listen_ports().items():
            if not port_is_free(host, port):
                raise ServeError(f"port {port} on {host} ({api} API) is already in use; stop what holds it "
                                 f"or choose other ports in {self.config_path.name}")
        saved = self.state.load()["models"]
        if models is None and saved:
            plan = [(name, info["file"], info) for name, m in saved.items() for info in m["versions"].values()]
            catalog = Catalog(self.model_store)
            for name, m in saved.items():
                for version in m["versions"]:
                    try:  # an archive changed since it was catalogued is not served again
                        if f"{name}/{version}" in catalog.load():
                            catalog.checked_archive(name, version)
                    except CatalogError as e:
                        raise ServeError(str(e)) from None
        else:
            if models is None:
                models = sorted(p.stem for p in self.model_store.glob("*.mar"))
            plan = [(m, f"{m}.mar", None) for m in models]
            self.state.save({"models": {}})
        missing = [file for _, file, _ in plan if not (self.model_store / file).is_file()]
        if missing:
            raise ServeError(f"no archive {self.model_store / missing[0]}; build it with scripts/archive")
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        cmd = [str(Path(sys.executable).parent / "torchserve"), "--start", "--ncs",
               "--ts-config", str(self._write_config()), "--model-store", str(self.model_store)]
        # The frontend inherits our stdout: send it to a file, not a pipe we would wait on.
        console = self.run_dir / "logs" / "console.log"
        console.parent.mkdir(parents=True, exist_ok=True)
        with open(console, "ab") as log:
            code = subprocess.run(cmd, cwd=self.run_dir, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL).returncode
        if code != 0:
            raise ServeError(f"torchserve --start failed (exit {code}); see {console}")
        self.wait_ready([], timeout)
        for name, file, info in plan:
            if info is None:
                self.register(name, file, timeout=timeout)
            else:  # restoring: the record already holds this version
                self.register(name, file, workers=info["min_workers"], timeout=timeout, record=False)
                if info["max_workers"] != info["min_workers"]:
                    self.scale(name, archive_manifest(self.model_store / file)["version"],
                               info["min_workers"], info["max_workers"], record=False)
        if models is None and saved:
            for name, m in saved.items():
                self.set_default(name, m["default"], record=False)

    # -- the management API ---------------------------------------------------------------

    def manage(self, method: str, path: str, **params) -> dict:
        """One management call; a refusal becomes a ServeError carrying TorchServe's message."""
        if method == "POST" and path == "/models" and (self.model_store / str(params.get("url", ""))).is_file():
            # A damaged archive of the store: say so, rather than TorchServe's "Failed to save model".
            archive_manifest(self.model_store / params["url"])
        try:
            r = requests.request(method, self.url("management") + path, params=params or None,
                                 headers=self.headers("management"), timeout=600)
        except requests.ConnectionError:
            raise ServeError(f"TorchServe is not answering at {self.url('management')}; start it with scripts/serve start") from None
        try:
            body = r.json()
        except ValueError:
            body = {"message": r.text.strip()}
        if r.status_code >= 400:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise ServeError(f"TorchServe refused {method} {path}: {message} (HTTP {r.status_code})")
        return body

    def versions(self, name: str) -> list[dict]:
        """Every registered version of `name` with its workers (GET /models/{name}/all)."""
        return self.manage("GET", f"/models/{name}/all")

    def register(self, name: str, file: str, *, workers: int | None = None, timeout: float = 180,
                 record: bool = True) -> str:
        """Register an archive of the store under `name`, wait for its workers; returns its version."""
        info = archive_manifest(self.model_store / file)
        workers = info["min_workers"] if workers is None else workers
        self.manage("POST", "/models", url=file, model_name=name, initial_workers=workers, synchronous="true")
        self.wait_ready([f"{name}/{info['version']}"], timeout)
        if record:
            with self.state.editing() as state:
                model = state["models"].setdefault(name, {"versions": {}, "default": info["version"], "previous_defaults": []})
                model["versions"][info["version"]] = {"file": file, "min_workers": workers,
                                                      "max_workers": max(workers, info["max_workers"])}
        return info["version"]

    def set_default(self, name: str, version: str, *, record: bool = True) -> None:
        self.manage("PUT", f"/models/{name}/{version}/set-default")
        if record:
            with self.state.editing() as state:
                model = state["models"][name]
                if model["default"] != version:
                    model["previous_defaults"].append(model["default"])
                    model["default"] = version

    def rollback(self, name: str) -> tuple[str, str]:
        """Make the previous default the default again; returns (was, now)."""
        model = self.state.load()["models"].get(name)
        if not model or not model["previous_defaults"]:
            raise ServeError(f"{name} has no previous default to roll back to")
        previous = model["previous_defaults"][-1]
        self.manage("PUT", f"/models/{name}/{previous}/set-default")
        with self.state.editing() as state:
            model = state["models"][name]
            current = model["default"]
            model["previous_defaults"].pop()
            model["default"] = previous
        return current, previous

    def scale(self, name: str, version: str, min_workers: int, max_workers: int, *, record: bool = True) -> None:
        self.manage("PUT", f"/models/{name}/{version}", min_worker=min_workers, max_worker=max_workers,
                    synchronous="true")
        if record:
            with self.state.editing() as state:
                state["models"][name]["versions"][version].update(min_workers=min_workers, max_workers=max_workers)

    def unregister(self, name: str, version: str) -> None:
        self.manage("DELETE", f"/models/{name}/{version}")
        with self.state.editing() as state:
            model = state["models"].get(name)
            if model:
                model["versions"].pop(version, None)
                model["previous_defaults"] = [v for v in model["previous_defaults"] if v != version]
                if not model["versions"]:
                    del state["models"][name]

    def wait_ready(self, models: list[str], timeout: float = 180) -> None:
        """Wait until the frontend answers and every model has a READY worker."""
        deadline = time.time() + timeout
        pending = list(models)
        while time.time() < deadline:
            if not self.is_running() and time.time() > deadline - timeout + 5:
                raise ServeError(f"TorchServe exited during start-up; see {self.run_dir / 'logs' / 'ts_log.log'}\n{self.log_tail()}")
            try:
                pending = [m for m in pending if not any(
                    w.get("status") == "READY" for d in self.describe(m) for w in d.get("workers", []))]
                self.manage("GET", "/models")  # the frontend answers
                if not pending:
                    return
            except (ServeError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.5)
        raise ServeError(f"model(s) {', '.join(pending)} not ready after {timeout:.0f}s; "
                         f"see {self.run_dir / 'logs' / 'model_log.log'}\n{self.log_tail('model_log.log')}")

    def log_tail(self, name: str = "ts_log.log", lines: int = 15) -> str:
        path = self.run_dir / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop(self, timeout: float = 60) -> bool:
        """Stop the server of this run folder; returns False if none was running."""
        pid = self.pid()
        if pid is None:
            return False
        subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], cwd=self.run_dir,
                       env=self._env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline and _alive(pid):
            time.sleep(0.3)
        if _alive(pid):
            os.kill(pid, 9)
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our own finished child) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / ".serve"), help="folder for the server's config, logs and keys (default: .serve/)")
    p.add_argument("--config", default=str(ROOT / "config.properties"), help="TorchServe config to start from (default: config.properties)")
    p.add_argument("--model-store", default=None, help="folder of .mar files (default: model_store from the config)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start TorchServe and wait until its models are ready")
    s.add_argument("--models", default=None,
                   help="comma-separated model names, each served from <name>.mar; 'all' for every .mar in the store, "
                        "'none' to start empty and register with scripts/models "
                        "(default: restore what this run folder served before, else all)")
    s.add_argument("--timeout", type=float, default=180, help="seconds to wait for the models to be ready (default: 180)")
    sub.add_parser("stop", help="stop the TorchServe of this run folder")
    sub.add_parser("status", help="say whether it runs, where, and which models it serves")
    k = sub.add_parser("key", help="print the current token key, for curl -H 'Authorization: Bearer KEY'")
    k.add_argument("kind", nargs="?", default="inference", choices=("inference", "management", "API"),
                   help="which key (default: inference)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    ts = TorchServe(run_dir=Path(args.run_dir), model_store=args.model_store and Path(args.model_store), config=Path(args.config))
    try:
        if args.command == "start":
            if args.models == "none":
                models = []
            elif args.models == "all":
                models = sorted(p.stem for p in ts.model_store.glob("*.mar"))
            else:
                models = None if args.models is None else [m for m in args.models.split(",") if m]
            ts.start(models, timeout=args.timeout)
            print(f"TorchServe is serving {', '.join(ts.models()) or 'no models'} at {ts.url('inference')} "
                  f"(management {ts.url('management')}); stop it with scripts/serve stop")
        elif args.command == "stop":
            print("TorchServe stopped" if ts.stop() else f"no TorchServe running from {ts.run_dir}")
        elif args.command == "status":
            if not ts.is_running():
                print(f"not running (run folder {ts.run_dir})")
                return 1
            print(f"running, pid {ts.pid()}, inference {ts.url('inference')}, management {ts.url('management')}")
            for name in ts.models():
                for d in ts.describe(name):
                    workers = ", ".join(f"{w['id']}:{w['status']}" for w in d.get("workers", []))
                    print(f"  {name} v{d.get('modelVersion')}  batch {d.get('batchSize')}  workers [{workers}]")
        elif args.command == "key":
            print(ts.key(args.kind))
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
