#!/usr/bin/env bash
# Installs everything explainserve needs, from scratch, on a Debian machine with Python 3.11.
# Idempotent: each step is skipped when its result is already there.
#   scripts/setup.sh            everything: the package, its dev extra and the test tools
#   scripts/setup.sh system     only the Debian packages, the venv and torch (the image's cached layer)
# EXPLAINSERVE_PROFILE=serve (the container image) leaves out what only the tests use:
# Prometheus, Alertmanager, Chromium and the dev extra; it installs the timm extra instead,
# which TorchServe needs to rebuild a model archived with --timm.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:-all}
PROFILE=${EXPLAINSERVE_PROFILE:-dev}
case "$PROFILE" in
  dev) test_packages=(prometheus prometheus-alertmanager chromium); extra=dev ;;
  serve) test_packages=(); extra=timm ;;
  *) echo "setup: EXPLAINSERVE_PROFILE must be dev or serve, not '$PROFILE'"; exit 2 ;;
esac

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv

apt_missing=()
# dataset-fashion-mnist feeds the demo models and stores; chromium renders the bulk report in
# its tests, prometheus-alertmanager delivers the alerts in theirs.
for pkg in dataset-fashion-mnist "${test_packages[@]}"; do
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
if [ "$STEP" = system ]; then
  "$VENV/bin/python" -c "import torch, torchvision" || { echo "setup: torch did not install"; exit 1; }
  echo "setup: system ok"; exit 0
fi
"$VENV/bin/pip" install -q -e ".[$extra]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" scripts/gen_protos.py
"$VENV/bin/python" -c "import torch, torchvision, explainserve" \
  || { echo "setup: the install did not complete"; exit 1; }
echo "setup: ok"
