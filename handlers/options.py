"""The one schema of an archive's options, checked at archive time and again when a worker loads.

`MODEL_OPTIONS` are the settings scripts/archive turns into model-config.yaml (TorchServe's
workers, batching and timeouts); `HANDLER_OPTIONS` are the keys of that file's `handler:`
section, read by the handlers. Each has a type and a range or a set of choices, and
`check_options` adds the relations between them. An unknown key gets a "did you mean".
scripts/archive refuses a bad option before it builds anything; a worker given one anyway
(an archive made by hand or by another tool) refuses to load with one log line.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from handlers.runtimes import AUTOCAST_DTYPES, CPU_ONLY, RUNTIMES

AUTOCAST = tuple(AUTOCAST_DTYPES)
EXPLAIN_BASELINES = ("mean", "black", "white", "blur")  # what Integrated Gradients starts from
EXPLAIN_METHODS = ("integrated_gradients", "attention_rollout")  # the first is the default
EXPLAIN_STEPS, EXPLAIN_MAX_STEPS = 32, 128  # its defaults
PRESETS = ("latency", "throughput", "balanced", "auto")  # scripts/ops/presets.py fills the settings


REFUSAL = "refuses to load:"  # scripts/serve looks for these words in model_log.log


class OptionError(ValueError):
    """An option breaks the schema; the message names it and what is allowed."""


@dataclass(frozen=True)
class Option:
    kind: type  # int, float, bool or str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    optional: bool = False  # None allowed (means: the default)

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        word = {int: "a whole number", float: "a number", list: "a list", dict: "a mapping"}.get(self.kind, "text")
        if self.low is not None and self.high is not None:
            return f"{word} from {self.low:,} to {self.high:,}"
        return f"{word} >= {self.low:,}" if self.low is not None else word

    def check(self, key: str, value, where: str):
        if value is None and self.optional:
            return None
        ok = isinstance(value, self.kind) and not (self.kind is not bool and isinstance(value, bool))
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if ok and self.choices:
            ok = value in self.choices
        if ok and self.low is not None:
            ok = value >= self.low
        if ok and self.high is not None:
            ok = value <= self.high
        if not ok:
            raise OptionError(f"{where}{key} must be {self.allowed()}, got {value!r}")
        return value


MODEL_OPTIONS = {
    "workers": Option(int, 1, 64),
    "max_workers": Option(int, 1, 64, optional=True),
    "batch_size": Option(int, 1, 1024),
    "max_batch_delay": Option(int, 0, 60_000),
    "response_timeout": Option(int, 1, 86_400),
    "device": Option(str, choices=("auto", "cpu", "gpu")),
    "topk": Option(int, 1, 10_000),
    "torch_threads": Option(int, 0, 1024),
    "runtime": Option(str, choices=RUNTIMES),
    "handler": Option(dict),
    "preset": Option(str, choices=PRESETS, optional=True),  # archive time only, kept in archive.json
    "target_cores": Option(int, 1, 1024, optional=True),  # the cores a preset sizes for (default: this host's)
}
HANDLER_OPTIONS = {
    "topk": Option(int, 1, 10_000),
    "runtime": Option(str, choices=RUNTIMES),
    "torch_threads": Option(int, 1, 1024),
    "max_pixels": Option(int, 1, 1_000_000_000),
    "max_bytes": Option(int, 1, 1 << 30),
    "gpu_decode": Option(bool),
    "channels_last": Option(bool),
    "autocast": Option(str, choices=AUTOCAST),
    "warmup_batch_sizes": Option(list),
    "threshold": Option(float, 0, 1),  # multi-label classification
    "score_threshold": Option(float, 0, 1),  # detection
    "max_detections": Option(int, 0, 1000),
    "max_n": Option(int, 1, 1024),  # generation
    "explain_steps": Option(int, 1, 1024),  # Integrated Gradients (handlers/explain.py)
    "explain_max_steps": Option(int, 1, 1024),
    "explain_baseline": Option(str, choices=EXPLAIN_BASELINES),
    "explain_method": Option(str, choices=EXPLAIN_METHODS),  # rollout: Vision Transformer classifiers only
    "explain_memory_mb": Option(float, 0.001, 1 << 20, optional=True),
    "metrics": Option(bool),  # handler metrics on /metrics (handlers/metrics.py)
    "json_logs": Option(bool),  # one JSON line per batch and per refused item
}


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown_key(key, known, where: str) -> OptionError:
    return OptionError(f"{where}{str(key)!r} is not a known key: {did_you_mean(key, known)}known: {', '.join(known)}")


def check_keys(mapping: dict, known, where: str = "") -> None:
    for key in mapping:
        if key not in known:
            raise unknown_key(key, known, where)


def check_handler_options(handler: dict, where: str = "handler option ") -> dict:
    """The handler section, each key known and each value in range; returns it unchanged."""
    if not isinstance(handler, dict):
        raise OptionError(f"the handler section must be a mapping, got {handler!r}")
    check_keys(handler, HANDLER_OPTIONS, where)
    for key, value in handler.items():
        HANDLER_OPTIONS[key].check(key, value, where)
    steps, most = handler.get("explain_steps", EXPLAIN_STEPS), handler.get("explain_max_steps", EXPLAIN_MAX_STEPS)
    if steps > most:
        raise OptionError(f"{where}explain_steps ({steps}) must be at most explain_max_steps ({most})")
    sizes = handler.get("warmup_batch_sizes")
    if sizes is not None and not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise OptionError(f"{where}warmup_batch_sizes must be a list of whole numbers >= 1, got {sizes!r}")
    return handler


def check_options(options: dict, where: str = "") -> dict:
    """Model options (MODEL_OPTIONS keys) checked one by one and against each other."""
    check_keys(options, MODEL_OPTIONS, where)
    out = {key: MODEL_OPTIONS[key].check(key, value, where) for key, value in options.items()}
    check_handler_options(out.get("handler") or {}, f"{where}handler option ")
    workers, most = out.get("workers", 1), out.get("max_workers")
    if most is not None and most < workers:
        raise OptionError(f"{where}max_workers ({most}) must be at least workers ({workers})")
    if out.get("runtime") in CPU_ONLY and out.get("device") == "gpu":
        raise OptionError(
            f"{where}runtime {out['runtime']} runs on the CPU only; use device cpu or auto, "
            "or another runtime for a GPU"
        )
    if "runtime" in (out.get("handler") or {}):
        raise OptionError(f"{where}set the runtime with --runtime (the runtime option), not as a handler option")
    return out


def check_model_config(config: dict) -> None:
    """A model-config.yaml as a worker reads it: TorchServe's numbers and the handler section."""
    for key, low in (
        ("minWorkers", 1),
        ("maxWorkers", 1),
        ("batchSize", 1),
        ("maxBatchDelay", 0),
        ("responseTimeout", 1),
    ):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise OptionError(f"model-config {key} must be a whole number >= {low}, got {value!r}")
    check_handler_options(config.get("handler") or {})


def refuse_bad_config(config: dict, log) -> None:
    """In a worker: log one line naming the bad option and raise, so that registration
    fails at once with that line (scripts/serve watches for it) instead of crash-looping."""
    try:
        check_model_config(config)
    except OptionError as e:
        log.error("%s %s", REFUSAL, e)
        raise
