#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv with the locked versions of every dependency
# group (requirements/dev.txt: serve, train and dev, compiled from pyproject.toml by scripts/lock) and
# makes sure Java 17, which TorchServe's frontend needs, Prometheus (promtool) and the load
# generators wrk and hey are installed.
# Idempotent: a second run checks and returns in a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want="$(sha256sum requirements/dev.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements/dev.txt into .venv (torch is large: a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
  echo "$want" > "$stamp"
fi

java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if ! command -v java >/dev/null || [ "$(java_major)" -lt 17 ]; then
  echo "setup: Java 17 not found; installing openjdk-17-jre-headless"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  else
    echo "error: Java 17 is required by TorchServe and apt-get is not available; install Java 17 and rerun" >&2
    exit 1
  fi
fi
# Prometheus and promtool: the monitoring rules' unit tests and the scrape test (monitoring/).
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "setup: promtool/prometheus not found; installing Debian's prometheus package"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "error: promtool and prometheus are required by the monitoring tests and apt-get is not available; install Prometheus 2.x and rerun" >&2
    exit 1
  fi
fi
# wrk and hey: the native HTTP load generators of the serving benchmarks (scripts/bench/loadgen.py);
# they fall back to a Python client, which shares the cores with the server, where these are missing.
if ! command -v wrk >/dev/null || ! command -v hey >/dev/null; then
  echo "setup: wrk/hey not found; installing Debian's wrk and hey packages (the benchmarks' load generators)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends wrk hey >/dev/null
  else
    echo "setup: apt-get is not available; install wrk and hey for the serving benchmarks (they fall back to Python)" >&2
  fi
fi
echo "setup: ready ($(.venv/bin/python --version), torch $(.venv/bin/python -c 'from importlib.metadata import version; print(version("torch"))'), java $(java_major))"
