"""The HTTP load every serving benchmark puts on a server, from native load generators.

A Python client shares the interpreter lock and the cores with what it measures: on two cores
it cost the served digits model a quarter of its throughput. Two native tools from Debian
(installed by scripts/setup.sh) send the load instead:

- closed loop: `wrk` (C, one event loop per thread): `clients` keep-alive connections, each
  sending its next request when the last is answered, for whole seconds (at least 1). A Lua
  script (WRK_DONE) prints its own statistics: exact percentiles and the mean from its
  HdrHistogram, the answers of 400 and over, and the requests that got no answer (connect,
  read, write errors and timeouts);
- open loop: `hey -q`, a fixed total rate spread over enough connections that each sends one
  request every OPEN_LOOP_INTERVAL_S. Neither tool has a wrk2-style schedule (Debian's wrk
  4.1 has no rate; hey's is per connection): a connection whose answer comes late sends its
  next request late, so when the achieved rate falls under the asked one (`behind` in the
  result) the latencies are understated. hey states a percentile only from enough requests
  (p50 from 4, p99 from 100); one it does not state is None here, never estimated.

Each result says which tool sent the load and what it cost: its own CPU time per request
(the kernel's accounting of the child, `wait4`), so a reader can see that the client was not
what capped the server; and, given the server's pid, the server's CPU per request from /proc
(the frontend and every worker it started).

Without wrk and hey the harness's Python client (scripts/bench/harness.py) sends the same
loads, the output says so in one line and each result says `"generator": "python"` (its CPU
time is the whole process's, and the server's CPU then covers the client's unmeasured warm-up
too: an overstatement).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from scripts.bench.harness import closed_loop, open_loop
from scripts.ops.client import Client

GENERATORS = ("auto", "native", "python")
OPEN_LOOP_INTERVAL_S = 0.1  # each open-loop connection sends at most 10 requests/s
WARM_S = 1.0  # an unmeasured load first: connections opened, the JVM's paths compiled


class LoadError(RuntimeError):
    """The load generator could not run (missing, refused its arguments, or printed no results)."""


def native_missing() -> list[str]:
    return [tool for tool in ("wrk", "hey") if shutil.which(tool) is None]


def pick(generator: str = "auto") -> str:
    """ "native" (wrk and hey) where both are installed (auto), else "python"."""
    if generator not in GENERATORS:
        raise ValueError(f"--load-generator {generator!r}: choose one of {', '.join(GENERATORS)}")
    missing = native_missing()
    if generator == "native" and missing:
        raise ValueError(
            f"--load-generator native: {' and '.join(missing)} not on PATH (scripts/setup.sh installs them)"
        )
    if generator == "auto":
        return "python" if missing else "native"
    return generator


def fallback_note(generator: str) -> str | None:
    """One line for the output when the Python client stands in for the native generators."""
    if generator == "python":
        missing = " and ".join(native_missing()) or "nothing"
        return (
            f"load generator: the Python client ({missing} not installed: scripts/setup.sh installs them); "
            "it shares the cores with the server"
        )
    return None


def server_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` and every live descendant (TorchServe's
    frontend and its Python workers), from /proc; None without a pid."""
    if pid is None:
        return None
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def run_tool(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, the child's CPU seconds, wall seconds) of one run of a load generator."""
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, error = out.read(), err.read()
    if proc.returncode != 0:
        raise LoadError(f"{cmd[0]} exited with {proc.returncode}: {(error or text).strip()[-300:]}")
    return text, usage.ru_utime + usage.ru_stime, wall


# wrk's own statistics at the end of a run, as one line of JSON (latencies in microseconds).
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"duration_us": %d, "requests": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d, "p50": %.1f, "p90": %.1f, "p99": %.1f, "mean": %.3f}\\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def wrk_script(path: Path, headers: dict, body: Path, content_type: str) -> Path:
    """The Lua script that makes wrk send our request and print its figures as JSON."""

    def lua(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid Lua string literal for these values

    lines = [
        f"wrk.method = {lua('POST')}",
        f"local f = assert(io.open({lua(str(body))}, 'rb'))",
        "wrk.body = f:read('*a')",
        "f:close()",
        f"wrk.headers['Content-Type'] = {lua(content_type)}",
    ]
    lines += [f"wrk.headers[{lua(k)}] = {lua(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n" + WRK_DONE)
    return path


def parse_wrk(text: str, items: int = 1) -> dict:
    """wrk's JSON line: throughput of answers under 400, exact percentiles (its HdrHistogram),
    errors (no connection, read/write failures, timeouts, answers of 400 and over)."""
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise LoadError(f"wrk printed no figures: {text.strip()[-300:]}")
    w = json.loads(line.removeprefix("WRK_JSON "))
    failed = w["connect"] + w["read"] + w["write"] + w["timeout"]
    ok = w["requests"] - w["status"]
    answered = w["requests"] > 0

    def ms(us: float) -> float | None:
        return round(us / 1000, 3) if answered else None

    return {
        "throughput": round(ok * items / (w["duration_us"] / 1e6), 2),
        "requests": w["requests"] + failed,
        "errors": w["status"] + failed,
        "p50": ms(w["p50"]),
        "p90": ms(w["p90"]),
        "p99": ms(w["p99"]),
        "mean_ms": ms(w["mean"]),
        "errors_by_kind": {k: w[k] for k in ("status", "connect", "read", "write", "timeout") if w[k]},
    }


def parse_hey(text: str, items: int = 1) -> dict:
    """hey's summary: throughput of 200s, latency percentiles, phase means, errors."""

    def seconds(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m[1]) if m else None

    total = seconds(r"Total:\s+([\d.]+) secs")
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", text)}
    errors_part = text.split("Error distribution:", 1)[1] if "Error distribution:" in text else ""
    failed = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]", errors_part, re.M))  # no answer at all
    if total is None:
        raise LoadError(f"hey printed no summary: {text.strip()[-300:]}")
    ok = codes.get(200, 0)

    def ms(pattern: str) -> float | None:
        v = seconds(pattern)
        return None if v is None or not ok else round(v * 1000, 1)

    return {
        "throughput": round(ok * items / total, 2) if total else 0.0,
        "requests": sum(codes.values()) + failed,
        "errors": sum(codes.values()) - ok + failed,
        "p50": ms(r"50%+ in ([\d.]+) secs"),
        "p90": ms(r"90%+ in ([\d.]+) secs"),
        "p99": ms(r"99%+ in ([\d.]+) secs"),
        "mean_ms": ms(r"Average:\s+([\d.]+) secs"),
        "phases_ms": {
            "write": ms(r"req write:\s+([\d.]+) secs"),
            "wait": ms(r"resp wait:\s+([\d.]+) secs"),
            "read": ms(r"resp read:\s+([\d.]+) secs"),
        },
        "status_codes": codes,
    }


def hey_args(url: str, headers: dict, body: Path, content_type: str, connections: int, seconds: float) -> list[str]:
    """hey's flags for a load of `seconds` on `connections`, each POSTing `body`."""
    args = ["-z", f"{seconds:g}s", "-c", str(connections), "-t", "120", "-disable-compression"]
    args += ["-m", "POST", "-D", str(body), "-T", content_type]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    return args


def generator_cost(result: dict, generator: str, cpu_s: float) -> dict:
    n = result["requests"]
    return result | {
        "generator": generator,
        "generator_cpu_s": round(cpu_s, 3),
        "generator_cpu_ms_per_request": round(cpu_s / n * 1000, 4) if n else None,
    }


class Load:
    """Loads on one URL with one body, by the chosen generator; `server_pid` (TorchServe's
    frontend, or another server's main process) adds the server's CPU per request."""

    def __init__(
        self,
        url: str,
        headers: dict,
        body: bytes,
        *,
        content_type: str = "image/jpeg",
        generator: str = "auto",
        server_pid: int | None = None,
        items_per_request: int = 1,
    ):
        self.url, self.headers, self.body, self.content_type = url, headers, body, content_type
        self.generator = pick(generator)
        self.server_pid = server_pid
        self.items = items_per_request
        self._dir = Path(tempfile.mkdtemp(prefix="load-"))
        self.body_file = self._dir / "body"
        self.body_file.write_bytes(body)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _measured(self, run) -> dict:
        before = server_cpu_s(self.server_pid)
        result = run()
        after = server_cpu_s(self.server_pid)
        if before is not None and after is not None and result["requests"]:
            result["server_cpu_s"] = round(after - before, 3)
            result["server_cpu_ms_per_request"] = round((after - before) / result["requests"] * 1000, 3)
        return result

    def closed(self, clients: int, seconds: float, *, warm: bool = True) -> dict:
        """`clients` connections in a closed loop for `seconds` (wrk counts whole seconds: at
        least 1), after an unmeasured warm-up (`warm`; the Python client always warms up)."""
        if self.generator == "python":
            return self._measured(lambda: self._python(lambda: self._python_closed(clients, seconds))) | {
                "clients": clients
            }
        script = wrk_script(self._dir / "load.lua", self.headers, self.body_file, self.content_type)
        threads = max(1, min(clients, os.cpu_count() or 1))
        args = ["wrk", "-t", str(threads), "-c", str(clients), "--timeout", "120s", "-s", str(script)]
        if warm:
            run_tool([*args, "-d", f"{WARM_S:g}s", self.url])
            self.drain()

        def run() -> dict:
            text, cpu, _ = run_tool([*args, "-d", f"{max(1, round(seconds))}s", self.url])
            return generator_cost(parse_wrk(text, self.items), "wrk", cpu)

        result = self._measured(run) | {"clients": clients}
        self.drain()
        return result

    def open(self, rate: float, seconds: float) -> dict:
        """About `rate` requests/s for `seconds` whatever the answers do (see the module's note)."""
        if self.generator == "python":
            return self._measured(
                lambda: self._python(lambda: open_loop(self.url, self._py_headers(), self.body, rate, seconds))
            )
        connections = max(1, min(256, math.ceil(rate * OPEN_LOOP_INTERVAL_S)))
        args = hey_args(self.url, self.headers, self.body_file, self.content_type, connections, seconds)
        args += ["-q", f"{rate / connections:g}"]

        def run() -> dict:
            text, cpu, _ = run_tool(["hey", *args, self.url])
            return generator_cost(parse_hey(text, self.items), "hey", cpu)

        result = self._measured(run)
        self.drain()
        achieved = result["requests"] / seconds
        return result | {"rate": rate, "connections": connections, "behind": achieved < 0.95 * rate}

    def drain(self) -> None:
        """Wait for what a finished load left in the server: wrk and hey stop with requests in
        flight, and the server still runs them (TorchServe keeps them in its queue), so the next
        load would find the queue full of them (up to 64 at 64 clients: 503s beyond its 100).
        One more request is answered only once those before it are taken."""
        client = Client(self.url, self.headers, timeout=600, content_type=self.content_type)
        client.send(self.body)  # any answer, an error's too (a test's 404 endpoint), comes after the others
        client.close()

    # -- the Python client, where hey is missing -----------------------------------------

    def _py_headers(self) -> dict:
        return {**self.headers, "Content-Type": self.content_type}

    def _python_closed(self, clients: int, seconds: float) -> dict:
        return closed_loop(self.url, self._py_headers(), self.body, clients, seconds)

    def _python(self, run) -> dict:
        cpu = time.process_time()
        result = run()
        cpu = time.process_time() - cpu
        result["throughput"] = round(result["throughput"] * self.items, 2)
        return generator_cost(result, "python", cpu)
