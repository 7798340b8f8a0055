#!/usr/bin/env bash
# Start the inference server: ./server.sh nobatch|static|dynamic [KEY]
# Settings come from environment variables (README, "Server settings"); KEY, when given, is required from clients.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat >&2 <<'USAGE'
usage: ./server.sh nobatch|static|dynamic [KEY]
  nobatch   one request at a time
  static    waiting requests form a batch; nothing joins until its longest member is done
  dynamic   requests join the running batch at the next step (Orca-style continuous batching)
  KEY       optional API key: clients must send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'
environment: MODEL WEIGHTS DEVICE DTYPE HOST PORT THREADS MAX_BATCH MAX_WAITING KV_CACHE_GB KV_BLOCKS ... (README)
             GUNICORN_CONF: your own gunicorn config instead of gunicorn_conf.py
USAGE
}

case "${1:-}" in
  nobatch|static|dynamic) export POLICY="$1" ;;
  -h|--help) usage; exit 0 ;;
  *) [ -n "${1:-}" ] && echo "unknown policy '$1'" >&2; usage; exit 2 ;;
esac
if [ $# -ge 2 ]; then
  # an empty KEY is most often an unset variable ("$KEY"): refuse it rather than serve without a key
  if [ -z "$2" ] || [[ "$2" =~ [[:space:]] ]]; then
    echo "the API key is empty or has spaces; give a key, or none to serve without one" >&2; usage; exit 2
  fi
  export KEY="$2"
fi

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m gunicorn -c "${GUNICORN_CONF:-gunicorn_conf.py}" app:app
