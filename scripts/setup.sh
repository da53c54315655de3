#!/usr/bin/env bash
# Installs everything explainserve needs, from scratch, on a Debian machine with Python 3.11.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv

apt_missing=()
# chromium renders the bulk report in its tests; prometheus-alertmanager delivers the alerts in theirs.
for pkg in dataset-fashion-mnist prometheus prometheus-alertmanager chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg")
done
command -v java >/dev/null 2>&1 || apt_missing+=(openjdk-17-jre-headless)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${apt_missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${apt_missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  echo "setup: installing torch 2.14.1 / torchvision 0.29.1"
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/pip" install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" scripts/gen_protos.py
"$VENV/bin/python" -c "import torch, torchvision, explainserve" \
  || { echo "setup: the install did not complete"; exit 1; }
echo "setup: ok"
