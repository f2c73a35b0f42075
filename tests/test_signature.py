"""X-Hub-Signature-256 verification, against GitHub's documented test vector."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import SecretStr

from tests.conftest import GITHUB_FIXTURES
from webhooks.signature import secret_bytes, sign, verify


@pytest.fixture(scope="module")
def vector() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GITHUB_FIXTURES / "hmac-test-vector.json").read_text())
    return data


def test_sign_matches_githubs_test_vector(vector: dict[str, Any]) -> None:
    secret, payload = vector["secret"].encode(), vector["payload"].encode()
    assert sign(secret, payload) == vector["x_hub_signature_256"]


def test_verify_accepts_githubs_test_vector(vector: dict[str, Any]) -> None:
    secrets = secret_bytes([SecretStr(vector["secret"])])
    assert verify(secrets, vector["payload"].encode(), vector["x_hub_signature_256"])


def test_verify_refuses_a_changed_body_or_secret(vector: dict[str, Any]) -> None:
    header = vector["x_hub_signature_256"]
    assert not verify(secret_bytes([vector["secret"]]), b"Hello, World?", header)
    assert not verify(secret_bytes(["another secret"]), vector["payload"].encode(), header)


def test_any_configured_secret_may_sign(vector: dict[str, Any]) -> None:
    secrets = secret_bytes(["the new secret", SecretStr(vector["secret"])])
    assert verify(secrets, vector["payload"].encode(), vector["x_hub_signature_256"])
    assert verify(secrets, b"x", sign(b"the new secret", b"x"))


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        "sha256=",
        "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17",
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17 ",
        "sha256=75 71 07 ea 0e b2 50 9f c2 11 22 1c ce 98 4b 8a 37 57 0b 6d 75 86 c2 2c 46 f4 37 9c"
        " 8b 04 3e 17",
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e1",
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e1700",
        "sha256=zz",
        "sha256=ünïcode",
    ],
)
def test_malformed_headers_are_refused(vector: dict[str, Any], header: str | None) -> None:
    assert not verify(secret_bytes([vector["secret"]]), vector["payload"].encode(), header)


def test_empty_secrets_are_dropped() -> None:
    assert secret_bytes(["", SecretStr(""), "s"]) == (b"s",)
