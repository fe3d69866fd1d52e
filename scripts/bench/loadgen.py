"""The HTTP load every serving benchmark puts on a server, from a native load generator.

A Python client shares the interpreter lock and the cores with what it measures: on two cores
it cost the served digits model a quarter of its throughput. `hey` (Go, Debian package `hey`,
installed by scripts/setup.sh) sends the load instead, and its summary gives the latency
percentiles (to 0.1 ms; hey states p99 only from 100 requests and p90 from 10, and a
percentile it does not state is None here, never estimated), the answers' status codes, the
requests that got no answer at all (its error distribution), and the mean of each phase
(write, wait for the first byte, read).

- closed loop: `clients` connections, each sending its next request when the last is answered;
- open loop:   a fixed total rate spread over enough connections that each sends one request
  every OPEN_LOOP_INTERVAL_S (`hey -q`, a rate per connection). `hey` has no wrk2-style
  schedule: a connection whose answer comes late sends its next request late, so when the
  achieved rate falls under the asked one (`behind` in the result) the latencies are
  understated. Debian's `wrk` 4.1 has no fixed-rate mode either.

Each result says which generator sent the load and what it cost: the generator's own CPU
time per request (from the kernel's accounting of the child, `wait4`), so a reader can see
that the client was not what capped the server. The server's CPU per request comes from
/proc (`server_cpu_s`: the frontend and every worker it started).

Without `hey` on PATH the harness's Python client (scripts/bench/harness.py) sends the same
loads and the result says `"generator": "python"` (its CPU time is the whole process's, and
the server's CPU then covers the client's unmeasured warm-up too: an overstatement).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from scripts.bench.harness import closed_loop, open_loop, summary

GENERATORS = ("auto", "hey", "python")
OPEN_LOOP_INTERVAL_S = 0.1  # each open-loop connection sends at most 10 requests/s
WARM_S = 1.0  # an unmeasured load first: connections opened, the JVM's paths compiled


class LoadError(RuntimeError):
    """The load generator could not run (missing, refused its arguments, or printed no results)."""


def pick(generator: str = "auto") -> str:
    """The generator to use: `hey` where it is installed (auto), else the Python client."""
    if generator not in GENERATORS:
        raise ValueError(f"--load-generator {generator!r}: choose one of {', '.join(GENERATORS)}")
    if generator == "hey" and shutil.which("hey") is None:
        raise ValueError("--load-generator hey: `hey` is not on PATH (scripts/setup.sh installs it)")
    if generator == "auto":
        return "hey" if shutil.which("hey") else "python"
    return generator


def fallback_note(generator: str) -> str | None:
    """One line for the output when the Python client stands in for the native generator."""
    if generator == "python":
        return "load generator: Python client (hey is not installed: scripts/setup.sh installs it); it shares the cores"
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


def run_hey(args: list[str]) -> tuple[str, float, float]:
    """(stdout, the child's CPU seconds, wall seconds) of one `hey` run."""
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(["hey", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, error = out.read(), err.read()
    if proc.returncode != 0:
        raise LoadError(f"hey exited with {proc.returncode}: {(error or text).strip()[-300:]}")
    return text, usage.ru_utime + usage.ru_stime, wall


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


def hey_args(
    url: str, headers: dict, body: Path | None, content_type: str, connections: int, seconds: float
) -> list[str]:
    """hey's flags for a load of `seconds` on `connections`: POST `body`, or GET without one."""
    args = ["-z", f"{seconds:g}s", "-c", str(connections), "-t", "120", "-disable-compression"]
    args += ["-m", "POST", "-D", str(body), "-T", content_type] if body is not None else ["-m", "GET"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    return args


def get_loop(url: str, headers: dict, clients: int, seconds: float) -> dict:
    """The Python client's closed loop of GETs (the /ping stage of scripts/bench/fixed_cost.py)."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                conn.request("GET", parts.path, headers=headers)
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summary(latencies, errors[0], seconds) | {"clients": clients}


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
        body: bytes | None,
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
        self.body_file: Path | None = None
        if body is not None:
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
        """`clients` connections in a closed loop for `seconds`, after an unmeasured warm-up
        (`warm`; the Python client always warms up first)."""
        if self.generator == "python":
            return self._measured(lambda: self._python(lambda: self._python_closed(clients, seconds))) | {
                "clients": clients
            }
        args = hey_args(self.url, self.headers, self.body_file, self.content_type, clients, seconds)
        if warm:
            run_hey([*args[:1], f"{WARM_S:g}s", *args[2:], self.url])

        def run() -> dict:
            text, cpu, _ = run_hey([*args, self.url])
            return generator_cost(parse_hey(text, self.items), "hey", cpu)

        return self._measured(run) | {"clients": clients}

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
            text, cpu, _ = run_hey([*args, self.url])
            return generator_cost(parse_hey(text, self.items), "hey", cpu)

        result = self._measured(run)
        achieved = result["requests"] / seconds
        return result | {"rate": rate, "connections": connections, "behind": achieved < 0.95 * rate}

    # -- the Python client, where hey is missing -----------------------------------------

    def _py_headers(self) -> dict:
        return {**self.headers, "Content-Type": self.content_type}

    def _python_closed(self, clients: int, seconds: float) -> dict:
        if self.body is None:
            return get_loop(self.url, self.headers, clients, seconds)
        return closed_loop(self.url, self._py_headers(), self.body, clients, seconds)

    def _python(self, run) -> dict:
        cpu = time.process_time()
        result = run()
        cpu = time.process_time() - cpu
        result["throughput"] = round(result["throughput"] * self.items, 2)
        return generator_cost(result, "python", cpu)
