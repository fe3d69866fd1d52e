#!/bin/sh
# The serving image's start command (Containerfile CMD): runs one engine in the foreground as
# the container's main process (exec: SIGTERM from the runtime reaches the server itself).
#   container_serve.sh [--engine torchserve|kserve] [--config FILE] [--model-store DIR]
# --engine defaults to $ENGINE (the image sets torchserve), --config to
# /config/config.properties, --model-store to the config's model_store. The kserve engine serves
# every version the store's catalog.json lists (scripts/serve start --engine kserve --foreground),
# keeping its run folder in /home/model-server/work/kserve.
set -eu
engine="${ENGINE:-torchserve}"; config=/config/config.properties; store=""
die() { echo "error: $1" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) [ $# -ge 2 ] || die "--engine needs torchserve or kserve"; engine="$2"; shift 2 ;;
    --config) [ $# -ge 2 ] || die "--config needs a file"; config="$2"; shift 2 ;;
    --model-store) [ $# -ge 2 ] || die "--model-store needs a folder"; store="$2"; shift 2 ;;
    *) die "unknown option '$1' (allowed: --engine torchserve|kserve, --config FILE, --model-store DIR)" ;;
  esac
done
case "$engine" in torchserve | kserve) ;; *) die "ENGINE (or --engine) must be torchserve or kserve, got '$engine'" ;; esac
[ -f "$config" ] || die "--config $config: no such file"
[ -z "$store" ] || [ -d "$store" ] || die "--model-store $store: no such folder"
case "$engine" in
  torchserve)
    exec torchserve --start --foreground --ncs --ts-config "$config" ${store:+--model-store "$store"} ;;
  kserve)
    exec python3 -m scripts.cli.serve --run-dir /home/model-server/work/kserve --config "$config" \
      ${store:+--model-store "$store"} start --engine kserve --foreground --models all ;;
esac
