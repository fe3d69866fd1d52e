"""The TorchServe process of one run folder: start it with the bundle's config.properties,
stop it, register and scale versions, read its keys and serving record. scripts/serve is its
command line; scripts/models, the tests and the benchmarks drive it through `TorchServe`.

Each server keeps its state in a run folder (default `.serve/`, created 0700): the
effective config.properties, TorchServe's logs, the pid file, `key_file.json` (the token
keys TorchServe writes at each start; token authorization stays on), the serving record
(`serving.json`: versions, defaults, workers) and what the last start refused
(`refused.json`). `key` and `status` import no torch: they answer at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlparse

import requests
import yaml

from model_defs.usage import UsageError
from scripts.ops.catalog import Catalog, sha256_file
from scripts.ops.names import atomic_write, check_name, check_version, inside

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_RUN_DIR = ROOT / ".serve"
# Names the run folder for every command that takes --run-dir, when --run-dir is not given:
# `export BUNDLE_RUN_DIR=/srv/ts` once, and scripts/models, predict, top and serve find that server.
RUN_DIR_ENV = "BUNDLE_RUN_DIR"
LOG_CONFIG = ROOT / "scripts" / "log4j2.xml"  # one copy of each line, INFO, rotated by size
REFUSAL = "refuses to load:"  # the one line a worker logs for an archive option it cannot use

ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
# TorchServe always starts its gRPC servers too (there is no switch to turn them off).
GRPC_PORT_KEYS = {"grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}


def default_run_dir() -> Path:
    """The run folder a command uses when no --run-dir is given: $BUNDLE_RUN_DIR, else .serve/."""
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


RUN_DIR_HELP = f"the server's run folder (default: ${RUN_DIR_ENV} if set, else .serve/)"


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


def listen_ports(props: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Every (host, port) a server with these properties binds: three HTTP APIs, two gRPC ones."""
    out = {}
    for api, key in ADDRESS_KEYS.items():
        address = urlparse(props[key])
        out[api] = (address.hostname or "127.0.0.1", address.port or 80)
    for api, key in GRPC_PORT_KEYS.items():
        out[api] = (
            props.get(f"{api}_address", "127.0.0.1"),
            int(props.get(key, 7070 if api == "grpc_inference" else 7071)),
        )
    return out


def port_is_free(host: str, port: int) -> bool:
    """No server listens on host:port (connections of a stopped one waiting out TIME_WAIT do not
    count: the servers bind with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        workers = config.get("minWorkers", 1)
        most = config.get("maxWorkers", workers)
        version = str(manifest["model"]["modelVersion"])
    except (
        OSError,
        zipfile.BadZipFile,
        KeyError,
        TypeError,
        json.JSONDecodeError,
        yaml.YAMLError,
        AttributeError,
    ) as e:
        raise ServeError(f"{mar} is not a readable model archive ({e})") from None
    for key, value in (("minWorkers", workers), ("maxWorkers", most)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ServeError(
                f"{mar.name} declares {key} {value!r} in model-config.yaml; a model needs at least 1 "
                "worker: rebuild it with scripts/archive --workers N (N >= 1)"
            )
    handler = config.get("handler") if isinstance(config.get("handler"), dict) else {}
    return {
        "version": version,
        "min_workers": workers,
        "max_workers": max(workers, most),
        "torch_threads": handler.get("torch_threads") or 0,
    }


class ServingState:
    """What a server serves, kept in its run folder so a restart can restore it: per model
    its versions (archive file, workers), its default and the defaults before it. Written
    atomically, and only after the change it records has succeeded."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        if not self.path.is_file():
            return {"models": {}}
        try:
            state = json.loads(self.path.read_text())
            if isinstance(state.get("models"), dict):
                return state
        except (ValueError, AttributeError):
            pass
        raise ServeError(f"the serving record {self.path} is damaged; move it aside to start afresh")

    def save(self, state: dict) -> None:
        atomic_write(self.path, (json.dumps(state, indent=2) + "\n").encode())

    @contextmanager
    def editing(self):
        state = self.load()
        yield state
        self.save(state)


class TorchServe:
    """One TorchServe instance: its config, run folder, ports and token keys."""

    def __init__(
        self,
        run_dir: Path | None = None,
        model_store: Path | None = None,
        config: Path | None = None,
        ports: dict[str, int] | None = None,
    ):
        self.run_dir = Path(run_dir or default_run_dir()).resolve()
        self.config_path = Path(config or ROOT / "config.properties")
        if not self.config_path.is_file():
            raise UsageError(f"--config {self.config_path}: no such file")
        self.props = read_properties(self.config_path)
        self.state = ServingState(self.run_dir / "serving.json")
        effective = self.run_dir / "config.properties"
        if ports is None and effective.is_file():
            # A server started earlier from this run folder: talk to it on its own ports.
            self.props.update(read_properties(effective))
        store = Path(model_store or self.props.get("model_store", "model_store"))
        self.model_store = (store if store.is_absolute() else ROOT / store).resolve()
        if ports is not None:
            # Any port not given is picked free, so a server can run beside another.
            for api in ADDRESS_KEYS:
                self.props[ADDRESS_KEYS[api]] = f"http://127.0.0.1:{ports.get(api) or free_port()}"
            for api in GRPC_PORT_KEYS:
                self.props[GRPC_PORT_KEYS[api]] = str(ports.get(api) or free_port())
            # Workers talk to the frontend over /tmp/.ts.sock.<port>, from 9000 up by default.
            self.props["initial_worker_port"] = str(free_port())

    # -- addresses and keys -------------------------------------------------------------

    def hint(self, subcommand: str) -> str:
        """The scripts/serve command line that acts on this server, for messages."""
        return f"scripts/serve {subcommand} --run-dir {self.run_dir}"

    def url(self, api: str) -> str:
        return self.props[ADDRESS_KEYS[api]].rstrip("/")

    def listen_ports(self) -> dict[str, tuple[str, int]]:
        """Every (host, port) the server binds: the three HTTP APIs and the two gRPC ones."""
        return listen_ports(self.props)

    def set_ports(self, ports: dict[str, int]) -> None:
        """Listen on `ports` ({api: port}, the APIs of listen_ports) on the config's own hosts."""
        for api, port in ports.items():
            if api in ADDRESS_KEYS:
                address = urlparse(self.props[ADDRESS_KEYS[api]])
                self.props[ADDRESS_KEYS[api]] = address._replace(netloc=f"{address.hostname}:{port}").geturl()
            else:
                self.props[GRPC_PORT_KEYS[api]] = str(port)
        # Workers talk to the frontend over /tmp/.ts.sock.<port>, from 9000 up by default.
        self.props["initial_worker_port"] = str(free_port())

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    def key(self, kind: str = "inference") -> str | None:
        """The current token for `kind` (inference, management, API); None when auth is off."""
        if self.props.get("disable_token_authorization", "false").lower() == "true":
            return None
        if not self.key_file.is_file():
            raise ServeError(
                f"no token keys at {self.key_file}: is TorchServe running from {self.run_dir}? "
                f"(see {self.hint('status')})"
            )
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

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "tmp" / ".model_server.pid"

    def pid(self) -> int | None:
        """The pid of this run folder's server, or None. A pid file left behind by a server
        that died names whatever process has that pid now: only a live process whose command
        line is this run folder's server (`_owns`) counts."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def _owns(self, cmdline: list[str]) -> bool:
        """A java process running TorchServe's ModelServer with this run folder's config."""
        return "org.pytorch.serve.ModelServer" in cmdline and str(self.run_dir / "config.properties") in cmdline

    def _is_ours(self, pid: int) -> bool:
        import psutil

        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
            alive = proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
        return alive and self._owns(cmdline)

    def stale_pid_note(self) -> str:
        """For an error line: a pid file naming a process that is not this run folder's server."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return ""
        return (
            ""
            if self._is_ours(pid)
            else f" (its pid file names pid {pid}, not this run folder's TorchServe: left alone)"
        )

    def is_running(self) -> bool:
        return self.pid() is not None

    def models(self) -> list[str]:
        return [m["modelName"] for m in self.manage("GET", "/models")["models"]]

    def describe(self, name: str) -> list[dict]:
        """GET /models/{name} (the default version) or /models/{name}/{version}."""
        return self.manage("GET", f"/models/{name}")

    @property
    def refused_file(self) -> Path:
        return self.run_dir / "refused.json"

    def refused(self) -> list[str]:
        """What the last start of this run folder could not serve, one line per version."""
        try:
            return json.loads(self.refused_file.read_text())
        except (OSError, ValueError):
            return []

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
        atomic_write(path, ("\n".join(lines) + "\n").encode())
        return path

    def _make_run_dir(self) -> None:
        for folder in (self.run_dir, self.run_dir / "tmp", self.run_dir / "logs"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)

    def _check_catalogued(self, entries: dict, name: str, version: str | None, file: str) -> str | None:
        """Why the archive `file` may not be served as name/version (None when it may)."""
        entry = (
            entries.get(f"{name}/{version}")
            if version
            else next((e for e in entries.values() if e["file"] == file), None)
        )
        if entry is None:
            return None if version is None else f"{name}/{version} is not in the catalog; refusing {file}"
        if entry["file"] != file:
            return f"the catalog holds {name}/{version} in {entry['file']}, the serving record {file}; refusing it"
        path = self.model_store / file
        if not path.is_file():
            return f"archive {path} is missing"
        if sha256_file(path) != entry["sha256"]:
            return f"{file} has changed since it was catalogued (sha256 differs); refusing it"
        return None

    def plan(self, models: list[str] | None, *, everything: bool = False) -> tuple[list, list[str], dict, dict]:
        """What a start serves (see `start`): (name, version or None, file, recorded info or None)
        per version, the lines of what it refuses, the serving record and the catalog's entries."""
        names = [check_name(m) for m in models or []]
        saved = self.state.load()["models"]
        entries = Catalog(self.model_store).load()
        plan, refused = [], []
        for name, m in saved.items():
            for version, info in m["versions"].items():
                reason = self._check_catalogued(entries, name, version, info["file"])
                if reason:
                    refused.append(f"{name} {version}: {reason}")
                else:
                    plan.append((name, version, info["file"], info))
        wanted = [(n, f"{n}.mar") for n in names]
        if everything or (models is None and not saved):
            wanted += [(e["name"], e["file"]) for e in entries.values()]
        missing = [file for _, file in wanted if not (self.model_store / file).is_file()]
        if missing:
            have = sorted(p.stem for p in self.model_store.glob("*.mar"))
            raise ServeError(
                f"no archive {missing[0]} in {self.model_store} (there: {', '.join(have) or 'none'}); "
                "build it with scripts/archive"
            )
        recorded = {info["file"] for m in saved.values() for info in m["versions"].values()}
        for name, file in dict.fromkeys(wanted):
            if file not in recorded:
                reason = self._check_catalogued(entries, name, None, file)
                if reason:
                    refused.append(f"{name} ({file}): {reason}")
                else:
                    plan.append((name, None, file, None))
        return plan, refused, saved, entries

    def start(self, models: list[str] | None = None, timeout: float = 180, *, everything: bool = False) -> list[str]:
        """Start TorchServe and register its models; returns one line per version refused.

        What this run folder served before (serving.json: versions, workers, defaults) is
        always restored, each version only if the catalog knows it and its file's sha256
        matches. `models` adds models served from <name>.mar: a name given this way may be
        an archive the catalog does not know, a catalogued one must match its sha256.
        `everything` (or no `models` and no record) adds every catalogued version. A
        version that cannot be served is refused (listed in refused.json, for `status`)
        while the others are served; the record changes only for what was added.
        """
        for name in models or []:
            check_name(name)
        if shutil.which("java") is None:
            raise ServeError(
                "Java 17 was not found on PATH; TorchServe's frontend needs it. "
                "Run scripts/setup.sh (installs openjdk-17-jre-headless) or install Java 17."
            )
        if self.is_running():
            raise ServeError(
                f"TorchServe is already running from {self.run_dir} (pid {self.pid()}); "
                f"stop it first with {self.hint('stop')}"
            )
        for api, (host, port) in self.listen_ports().items():
            if not port_is_free(host, port):
                raise ServeError(
                    f"port {port} on {host} ({api} API) is already in use; stop what holds it "
                    "or choose other ports (scripts/serve start --port-offset N, or --inference-port and the others)"
                )
        plan, refused, saved, entries = self.plan(models, everything=everything)

        self._make_run_dir()
        self.key_file.unlink(missing_ok=True)
        cmd = [
            str(Path(sys.executable).parent / "torchserve"),
            "--start",
            "--ncs",
            "--log-config",
            str(LOG_CONFIG),
            "--ts-config",
            str(self._write_config()),
            "--model-store",
            str(self.model_store),
        ]
        # The launcher's own output goes to a file, not a pipe we would wait on; the logs
        # themselves are written by log4j2 (scripts/log4j2.xml).
        console = self.run_dir / "logs" / "console.log"
        with open(console, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)) as log:
            code = subprocess.run(
                cmd,
                cwd=self.run_dir,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                umask=0o077,
            ).returncode
        if code != 0:
            raise ServeError(f"torchserve --start failed (exit {code}); see {console}")
        self.wait_ready([], timeout)
        served = set()
        for name, version, file, info in plan:
            try:
                if info is None:  # added now: recorded once its workers are ready
                    entry = next((e for e in entries.values() if e["file"] == file), None)
                    self.register(name, file, timeout=timeout, version=entry and entry["version"])
                else:  # restoring: the record already holds this version
                    self.register(
                        name, file, workers=info["min_workers"], timeout=timeout, record=False, version=version
                    )
                    if info["max_workers"] != info["min_workers"]:
                        self.scale(name, version, info["min_workers"], info["max_workers"], record=False)
                    served.add((name, version))
            except (ServeError, UsageError) as e:
                refused.append(f"{name} {version or '(' + file + ')'}: {str(e).splitlines()[0]}")
        for name, m in saved.items():
            if (name, m["default"]) in served:
                self.set_default(name, m["default"], record=False)
        atomic_write(self.refused_file, (json.dumps(refused, indent=2) + "\n").encode())
        return refused

    # -- the management API ---------------------------------------------------------------

    def manage(self, method: str, path: str, **params) -> dict:
        """One management call; a refusal becomes a ServeError carrying TorchServe's message."""
        if method == "POST" and path == "/models" and (self.model_store / str(params.get("url", ""))).is_file():
            # A damaged archive of the store: say so, rather than TorchServe's "Failed to save model".
            archive_manifest(self.model_store / params["url"])
        try:
            r = requests.request(
                method,
                self.url("management") + path,
                params=params or None,
                headers=self.headers("management"),
                timeout=600,
            )
        except requests.ConnectionError:
            raise ServeError(
                f"TorchServe is not answering at {self.url('management')}; start it with {self.hint('start')}"
            ) from None
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
        return self.manage("GET", f"/models/{check_name(name)}/all")

    def register(
        self,
        name: str,
        file: str,
        *,
        workers: int | None = None,
        timeout: float = 180,
        record: bool = True,
        version: str | None = None,
    ) -> str:
        """Register an archive of the store under `name` and wait for its workers; returns its
        version. A worker that refuses to load fails this at once, and the half-registered
        version is removed again; the record changes only on success."""
        name = check_name(name)
        path = inside(self.model_store, file)
        if not path.is_file():
            raise ServeError(f"no archive {path}; build it with scripts/archive")
        info = archive_manifest(path)
        if version is not None and info["version"] != version:
            raise ServeError(f"{file} declares version {info['version']}, the catalog says {version}; refusing it")
        workers = info["min_workers"] if workers is None else workers
        self.manage("POST", "/models", url=file, model_name=name, initial_workers=workers, synchronous="false")
        try:
            self.wait_ready([f"{name}/{info['version']}"], timeout)
        except ServeError:
            with suppress(ServeError):
                self.manage("DELETE", f"/models/{name}/{info['version']}")
            raise
        if record:
            with self.state.editing() as state:
                model = state["models"].setdefault(
                    name, {"versions": {}, "default": info["version"], "previous_defaults": []}
                )
                model["versions"][info["version"]] = {
                    "file": file,
                    "min_workers": workers,
                    "max_workers": max(workers, info["max_workers"]),
                }
        return info["version"]

    def set_default(self, name: str, version: str, *, record: bool = True) -> None:
        self.manage("PUT", f"/models/{check_name(name)}/{check_version(version)}/set-default")
        if record:
            with self.state.editing() as state:
                model = state["models"].get(name)
                if model and model["default"] != version:
                    model["previous_defaults"].append(model["default"])
                    model["default"] = version

    def rollback(self, name: str) -> tuple[str, str]:
        """Make the previous default the default again; returns (was, now)."""
        model = self.state.load()["models"].get(check_name(name))
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
        self.manage(
            "PUT",
            f"/models/{check_name(name)}/{check_version(version)}",
            min_worker=min_workers,
            max_worker=max_workers,
            synchronous="true",
        )
        if record:
            with self.state.editing() as state:
                recorded = state["models"].get(name, {}).get("versions", {}).get(version)
                if recorded is not None:
                    recorded.update(min_workers=min_workers, max_workers=max_workers)

    def unregister(self, name: str, version: str) -> None:
        self.manage("DELETE", f"/models/{check_name(name)}/{check_version(version)}")
        with self.state.editing() as state:
            model = state["models"].get(name)
            if model:
                model["versions"].pop(version, None)
                model["previous_defaults"] = [v for v in model["previous_defaults"] if v != version]
                if not model["versions"]:
                    del state["models"][name]

    def wait_ready(self, models: list[str], timeout: float = 180) -> None:
        """Wait until the frontend answers and every model has a READY worker. A worker that
        refuses its archive's options fails the wait at once with the line it logged."""
        deadline = time.time() + timeout
        pending = list(models)
        model_log = self.run_dir / "logs" / "model_log.log"
        offset = model_log.stat().st_size if model_log.is_file() else 0
        while time.time() < deadline:
            if not self.is_running() and time.time() > deadline - timeout + 5:
                raise ServeError(
                    f"TorchServe exited during start-up; see {self.run_dir / 'logs' / 'ts_log.log'}\n{self.log_tail()}"
                )
            for model in pending:
                line = self.refusal(model, offset)
                if line:
                    raise ServeError(f"{model} refused to load: {line}")
            try:
                pending = [
                    m
                    for m in pending
                    if not any(w.get("status") == "READY" for d in self.describe(m) for w in d.get("workers", []))
                ]
                self.manage("GET", "/models")  # the frontend answers
                if not pending:
                    return
            except (ServeError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.5)
        raise ServeError(
            f"model(s) {', '.join(pending)} not ready after {timeout:.0f}s; "
            f"see {self.run_dir / 'logs' / 'model_log.log'}\n{self.log_tail('model_log.log')}"
        )

    def refusal(self, model: str, offset: int = 0) -> str | None:
        """The refusal line a worker of `name/version` (or of any version of `name`) logged
        after `offset` in model_log.log."""
        name, _, version = model.partition("/")
        path = self.run_dir / "logs" / "model_log.log"
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            f.seek(offset if path.stat().st_size >= offset else 0)
            text = f.read().decode(errors="replace")
        tag = f"-{name}_{version}-" if version else f"-{name}_"
        for line in text.splitlines():
            if REFUSAL in line and tag in line:
                return line.split(REFUSAL, 1)[1].strip()
        return None

    def log_tail(self, name: str = "ts_log.log", lines: int = 15) -> str:
        path = self.run_dir / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop(self, timeout: float = 60) -> bool:
        """Stop the server of this run folder; returns False if none was running. Only the
        process pid() vouches for is signalled, never whatever now holds a stale pid."""
        pid = self.pid()
        if pid is None:
            return False
        subprocess.run(
            [str(Path(sys.executable).parent / "torchserve"), "--stop"],
            cwd=self.run_dir,
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.time() + timeout
        while time.time() < deadline and self._is_ours(pid):
            time.sleep(0.3)
        if self._is_ours(pid):
            os.kill(pid, signal.SIGKILL)
        return True

    def refresh_key(self, kind: str) -> str:
        """New `kind` key through TorchServe's token API (authorized by the API key); the
        server rewrites key_file.json, and the old key stops working."""
        r = requests.get(
            self.url("management") + "/token",
            params={"type": kind},
            headers={"Authorization": f"Bearer {self.key('API')}"},
            timeout=30,
        )
        if r.status_code != 200:
            raise ServeError(f"TorchServe refused a new {kind} key: {' '.join(r.text.split())} (HTTP {r.status_code})")
        return self.key(kind)


def served_versions(run_dir: Path, model_store: Path) -> dict[str, str]:
    """{"name/version": archive file} that the running TorchServe of `run_dir` serves from
    `model_store`, per its serving record (nothing when it is stopped or serves another
    store: a stopped server's next start re-checks every archive against the catalog)."""
    config = Path(run_dir) / "config.properties"
    try:
        store = read_properties(config).get("model_store") if config.is_file() else None
        if not store or Path(store).resolve() != Path(model_store).resolve():
            return {}
        ts = TorchServe(run_dir=Path(run_dir), model_store=Path(store), config=config)
        if not ts.is_running():
            return {}
        models = ts.state.load()["models"]
    except (OSError, ServeError, UsageError):
        return {}
    return {f"{name}/{v}": info["file"] for name, m in models.items() for v, info in m["versions"].items()}
