#!/usr/bin/env bash
# Start the local stack: Redis (if nothing answers), the API on HOST:PORT, one edit worker,
# one datagen worker and one webhook worker, with file storage under ./var. Ctrl-C stops
# everything started.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
BIN=$VENV/bin
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
export INSTRUCTEDIT_REDIS_URL=${INSTRUCTEDIT_REDIS_URL:-redis://127.0.0.1:6379/0}
export INSTRUCTEDIT_STORAGE_URL=${INSTRUCTEDIT_STORAGE_URL:-file://$PWD/var/storage}

# MODEL=tiny / MODEL=tiny-sdxl: a tiny random SD 1.5 / SDXL InstructPix2Pix, generated once.
if [[ "${MODEL:-}" == "tiny" || "${MODEL:-}" == "tiny-sdxl" ]]; then
  family=sd15
  [[ "$MODEL" == "tiny-sdxl" ]] && family=sdxl
  if [[ ! -f var/models/$MODEL/model_index.json ]]; then
    echo "generating the tiny offline $family model in var/models/$MODEL ..."
    "$BIN/python" -m services.gpu_worker.tiny_model "var/models/$MODEL" --family "$family"
  fi
  if [[ ! -f var/models/tiny-sd/model_index.json ]]; then
    echo "generating the tiny offline text-to-image model in var/models/tiny-sd ..."
    "$BIN/python" -m services.datagen.tiny_sd var/models/tiny-sd
  fi
  export INSTRUCTEDIT_MODEL=$PWD/var/models/$MODEL
  export INSTRUCTEDIT_DATAGEN_MODEL=$PWD/var/models/tiny-sd
elif [[ -n "${MODEL:-}" ]]; then
  export INSTRUCTEDIT_MODEL=$MODEL
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo "stopping ..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

read -r redis_host redis_port < <("$BIN/python" -c '
import os, urllib.parse as u
url = u.urlparse(os.environ["INSTRUCTEDIT_REDIS_URL"])
print(url.hostname or "127.0.0.1", url.port or 6379)')

if ! "$BIN/python" -c 'import os, redis; redis.Redis.from_url(os.environ["INSTRUCTEDIT_REDIS_URL"]).ping()' 2>/dev/null; then
  if ! command -v redis-server >/dev/null; then
    echo "Nothing answers at $INSTRUCTEDIT_REDIS_URL and redis-server is not installed." >&2
    echo "Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)," >&2
    echo "or point INSTRUCTEDIT_REDIS_URL at a running Redis." >&2
    exit 1
  fi
  mkdir -p var/redis
  echo "starting redis-server on $redis_host:$redis_port ..."
  redis-server --bind "$redis_host" --port "$redis_port" --dir "$PWD/var/redis" \
    --save "" --appendonly no --logfile "$PWD/var/redis/redis.log" &
  pids+=($!)
  for _ in $(seq 50); do
    redis-cli -h "$redis_host" -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
fi

echo "model: ${INSTRUCTEDIT_MODEL:-timbrooks/instruct-pix2pix (default)}"
echo "storage: $INSTRUCTEDIT_STORAGE_URL"
"$BIN/celery" --app services.gpu_worker.celery_worker worker --queues edits \
  --pool prefork --concurrency 1 --loglevel INFO --hostname "edits@%h" &
pids+=($!)
"$BIN/celery" --app services.datagen.celery_worker worker --queues datagen \
  --pool prefork --concurrency 1 --loglevel INFO --hostname "datagen@%h" &
pids+=($!)
# Webhook deliveries wait on the network, not on a GPU: threads, several at once.
"$BIN/celery" --app services.webhooks.tasks worker --queues webhooks \
  --pool threads --concurrency 8 --loglevel INFO --hostname "webhooks@%h" &
pids+=($!)
# API keys: required unless said otherwise, except for local development on loopback.
if [[ -z "${INSTRUCTEDIT_AUTH:-}" ]]; then
  case "$HOST" in
    127.*|localhost|::1)
      export INSTRUCTEDIT_AUTH=disabled
      echo "auth: disabled, for local development (the API listens on $HOST only; INSTRUCTEDIT_AUTH=required turns keys on)"
      ;;
    *)
      echo "auth: required; create a key with: $BIN/python -m services.api keys create --name NAME"
      ;;
  esac
fi
# Output URLs are built from this, never from a request's Host header.
export INSTRUCTEDIT_PUBLIC_BASE_URL=${INSTRUCTEDIT_PUBLIC_BASE_URL:-http://$HOST:$PORT}
"$BIN/uvicorn" services.api.main:app --host "$HOST" --port "$PORT" &
pids+=($!)
echo "API on http://$HOST:$PORT (docs at /docs); Ctrl-C stops everything."

# Whichever exits first (e.g. a worker that cannot find its model) takes the rest down.
set +e
wait -n "${pids[@]}"
status=$?
exit $status
