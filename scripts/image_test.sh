#!/usr/bin/env bash
# make image-test: build deploy/Dockerfile with podman on a Debian bookworm base that mmdebstrap
# makes from Debian's packages (no container registry needed), then run tests/image/smoke.py in
# the image as uid 10001. Needs root; installs podman and mmdebstrap when they are missing.
# Prints name=value lines: the seconds of each step and the image size.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/image
IMAGE=${IMAGE:-localhost/explainserve:test}
BASE_IMAGE=localhost/explainserve-base:bookworm
BASE_TAR=$OUT/bookworm.tar
mkdir -p "$OUT"
started=$SECONDS

missing=()
for tool in podman mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# The base is made again once a week, for Debian's security updates.
step=$SECONDS
if [ -z "$(find "$BASE_TAR" -mtime -7 2>/dev/null)" ] || ! podman image exists "$BASE_IMAGE"; then
  mmdebstrap --variant=minbase --format=tar --include=python3.11-venv,ca-certificates bookworm "$BASE_TAR.partial"
  mv "$BASE_TAR.partial" "$BASE_TAR"
  podman import "$BASE_TAR" "$BASE_IMAGE"
fi
echo "image_base_seconds=$((SECONDS - step))"

# Builds run in a chroot (no user namespaces needed) on the host's network. pip in the build
# trusts what this machine trusts (a TLS-inspecting proxy's CA included), through a build
# secret that stays out of the image.
isolation=(--isolation=chroot --ignorefile deploy/Dockerfile.dockerignore)
secret=()
[ -s /etc/ssl/certs/ca-certificates.crt ] && secret=(--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt)
step=$SECONDS
podman build "${isolation[@]}" "${secret[@]}" --build-arg BASE="$BASE_IMAGE" -f deploy/Dockerfile -t "$IMAGE" .
echo "image_build_seconds=$((SECONDS - step))"
podman image prune -f >/dev/null  # the images this build replaced; the layers it shares with them stay
echo "image_size_mb=$(( $(podman image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))"

step=$SECONDS
podman build "${isolation[@]}" --no-cache --build-arg IMAGE="$IMAGE" -f tests/image/Containerfile \
  -t localhost/explainserve-smoke:test tests/image
podman rmi localhost/explainserve-smoke:test >/dev/null
echo "image_smoke_seconds=$((SECONDS - step))"
echo "image_test_seconds=$((SECONDS - started))"
