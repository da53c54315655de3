"""Kubernetes probe for TorchServe's HTTP ``/ping`` under token authorisation.

TorchServe 0.12 answers ``/ping`` with 400 (InvalidKeyException) unless the
request carries its inference key, and the key is generated at start-up, so a
static ``httpGet`` probe cannot pass. This script reads the key file TorchServe
wrote and asks ``/ping`` with it. Exit status 0 means TorchServe reported
"Healthy"; anything else (no key file yet, refused connection, wrong key,
unhealthy) exits 1 with the reason on stderr, which the kubelet records.

Usage::

    python torchserve_ping.py --url http://127.0.0.1:8080/ping \
        --key-file /run/torchserve/key_file.json [--timeout 3]
"""
import argparse
import json
import sys
import urllib.request


def inference_key(key_file):
    """Return the inference key from TorchServe's ``key_file.json``."""
    with open(key_file, encoding="utf-8") as handle:
        return json.load(handle)["inference"]["key"]


def ping(url, key_file=None, timeout=3.0):
    """Return None when TorchServe is healthy, otherwise the reason (str)."""
    headers = {}
    try:
        if key_file:
            headers["Authorization"] = "Bearer " + inference_key(key_file)
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = json.load(response).get("status")
    except (OSError, KeyError, ValueError) as error:  # URLError and HTTPError are OSErrors
        return f"{url}: {error}"
    return None if status == "Healthy" else f"{url}: status {status!r}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/ping")
    parser.add_argument("--key-file", help="TorchServe's key_file.json; omit when token auth is off")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    reason = ping(args.url, args.key_file, args.timeout)
    if reason:
        print(reason, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
