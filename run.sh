#!/usr/bin/env bash
# One entry point for a fresh machine: creates/reuses .venv from the lock, then runs a job.
#   ./run.sh demo   - the main job on the embedded demo defaults (local files, SQLite, no servers)
#   ./run.sh test   - the whole test suite (slow tests included)
#   ./run.sh lint   - ruff check + format check
#   ./run.sh skf …  - any skf CLI command inside the environment
set -euo pipefail
cd "$(dirname "$0")"

PY="${SKF_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP="$VENV/.skf-installed"
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-64)"

export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true MLFLOW_ALLOW_FILE_STORE=true
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] setting up $VENV (pinned stack from requirements.lock; a few minutes the first time)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # The lock pins every package (torch 2.14.1 + torchvision 0.29.1 included) so nothing pulls another torch.
  "$VENV/bin/python" -m pip install -q -c requirements.lock -r requirements.lock
  "$VENV/bin/python" -m pip install -q -c requirements.lock --no-deps -e ".[dev]"
  echo "$want" > "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"

cmd="${1:-demo}"; shift || true
case "$cmd" in
  demo) exec skf demo "$@" ;;
  test) exec python -m pytest -m "" -p no:cacheprovider "$@" ;;
  lint) ruff check . && exec ruff format --check . ;;
  skf)  exec skf "$@" ;;
  *) echo "usage: ./run.sh {demo|test|lint|skf ...}" >&2; exit 2 ;;
esac
