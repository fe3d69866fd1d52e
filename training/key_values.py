"""KEY=VALUE flags (`--model-arg`, scripts/archive's `--handler-option`) read one way: each
value as YAML, so `depth=4` is an int, `pretrained=false` a bool and `mean=[0.5]` a list."""

from __future__ import annotations

import yaml


def parse_key_values(pairs: list[str], flag: str, error: type[Exception] = ValueError) -> dict:
    """{KEY: value} of the pairs; `error` names the flag and the first malformed pair."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise error(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise error(f"{flag} {key}: {value!r} is not a readable value") from None
    return out
