"""The --auth-keys file: entries checked field by field, hashes matched, re-read on change."""

import json
import os

import pytest

from explainserve._generated import explain_pb2
from explainserve.sidecar.auth import KeyRing, key_sha256, new_key, parse_keys, requested_models


def test_entries_are_checked_field_by_field():
    digest = key_sha256("k")
    cases = [
        ("[]", r'expected \{"keys"'),
        ('{"keys": [{"sha256": "%s"}]}' % digest, r"keys\[0\]\.name: a non-empty string"),
        ('{"keys": [{"name": "a", "sha256": "ABC"}]}', r"keys\[0\]\.sha256: expected 64 lower-case hex digits"),
        ('{"keys": [{"name": "a", "sha256": "%s", "models": []}]}' % digest, r"keys\[0\]\.models: expected a non-empty list"),
        ("{nope", "not JSON"),
    ]
    for text, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_keys(text, "keys.json")
    (entry,) = parse_keys('{"keys": [{"name": "a", "sha256": "%s", "models": ["m"]}]}' % digest, "keys.json")
    assert entry.models == frozenset({"m"})


def test_keys_are_matched_by_hash_and_re_read_when_the_file_changes(tmp_path):
    first, second = new_key(), new_key()
    assert first.startswith("es_") and len(first) == 46 and first != second
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "first", "sha256": key_sha256(first)}]}))
    ring = KeyRing(path)
    assert ring.find(first).name == "first" and ring.find(second) is None
    assert first not in path.read_text()  # only the hash is stored
    replacement = tmp_path / "new.json"
    replacement.write_text(json.dumps({"keys": [{"name": "second", "sha256": key_sha256(second)}]}))
    os.replace(replacement, path)
    assert ring.find(first) is None and ring.find(second).name == "second"
    path.write_text("{broken")  # a bad edit keeps the keys in use
    assert ring.find(second).name == "second"
    with pytest.raises(ValueError, match="--auth-keys"):
        KeyRing(tmp_path / "missing.json")


def test_the_models_a_request_names():
    assert requested_models(explain_pb2.ExplainRequest(model="a")) == {"a"}
    batch = explain_pb2.ScoreBatchRequest(requests=[explain_pb2.ScoreRequest(model="a"), explain_pb2.ScoreRequest(model="b")])
    assert requested_models(batch) == {"a", "b"}


def test_the_models_an_open_inference_protocol_request_names():
    from explainserve._generated import grpc_predict_v2_pb2 as oip

    assert requested_models(oip.ModelInferRequest(model_name="a")) == {"a"}
    assert requested_models(oip.ModelMetadataRequest(name="b")) == {"b"}
    assert requested_models(oip.ModelReadyRequest(name="c")) == {"c"}
    assert requested_models(oip.ServerMetadataRequest()) == set()
