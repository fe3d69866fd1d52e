"""The HTTP client the benchmarks and the soak load a served model with, and the latency
percentiles they report. One keep-alive connection per client thread, on http.client:
requests costs the 2-core machine ~0.5 ms of CPU per call, which the served model would pay for."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import numpy as np


class Client:
    """One keep-alive connection posting bodies to `url`; reopened after a failure."""

    def __init__(self, url: str, headers: dict, timeout: float = 120, content_type: str | None = "image/jpeg"):
        parts = urlsplit(url)
        self.host, self.port, self.path, self.timeout = parts.hostname, parts.port, parts.path, timeout
        self.headers = {**headers, **({"Content-Type": content_type} if content_type else {})}
        self.conn: http.client.HTTPConnection | None = None

    def send(self, body: bytes, headers: dict | None = None) -> tuple[int, bytes | str]:
        """(HTTP status, body), or (0, the error) when no answer came (refused, reset, timed out)."""
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.request("POST", self.path, body=body, headers={**self.headers, **(headers or {})})
            r = self.conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return 0, repr(e)

    def post(self, image: bytes) -> tuple[bool, object]:
        """(True, the JSON answer) for a 200, else (False, the status or the error)."""
        status, body = self.send(image)
        if status != 200:
            return False, status or body
        try:
            return True, json.loads(body)
        except ValueError as e:
            self.close()
            return False, repr(e)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The q-th percentile of latencies in seconds, in milliseconds to 0.1 (None for none)."""
    return round(float(np.percentile(seconds, q)) * 1000, 1) if seconds else None
