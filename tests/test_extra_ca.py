"""Extra CA certificates (server setting extra_ca_certs) reach the base image's trust store."""

from __future__ import annotations

import contextlib
import datetime
import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bot.cacerts import read_certificates
from bot.errors import SettingsError
from bot.images import base_context, build_image, context_hash
from bot.settings import Settings

# Inside the container: a TLS server on localhost with a certificate the test CA signed, then
# the clients a project uses, each with the image's default trust settings.
PROBE = """
openssl s_server -quiet -accept 8443 -cert /tmp/tls/leaf.pem -key /tmp/tls/leaf.key -www \
    >/dev/null 2>&1 &
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break; sleep 0.1; done
curl -s -o /dev/null https://localhost:8443/ && echo curl=ok || echo curl=refused
python3 -c 'import urllib.request; urllib.request.urlopen("https://localhost:8443/")' \
    2>/dev/null && echo python=ok || echo python=refused
"""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A CA like an intercepting proxy's, and a localhost certificate it signed."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Trimo test egress CA"))
        .issuer_name(_name("Trimo test egress CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {"ca.pem": _pem(ca), "leaf.pem": _pem(leaf), "leaf.key": key_pem}


def _probe(client: docker.DockerClient, image: str, tls: dict[str, bytes]) -> str:
    container = client.containers.create(image, entrypoint=["/bin/bash", "-lc", PROBE])
    try:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name in ("leaf.pem", "leaf.key"):
                info = tarfile.TarInfo(f"tls/{name}")
                info.size = len(tls[name])
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(tls[name]))
        container.put_archive("/tmp", buf.getvalue())
        container.start()
        container.wait(timeout=60)
        return str(container.logs().decode())
    finally:
        container.remove(force=True)


def test_a_file_without_certificates_is_refused_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"notes.txt holds no PEM certificate"):
        read_certificates(bad)
    with pytest.raises(ValueError, match=r"missing.pem cannot be read"):
        read_certificates(tmp_path / "missing.pem")


def test_the_setting_fails_at_start_naming_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bundle.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("TRIMO_EXTRA_CA_CERTS", str(bad))
    with pytest.raises(SettingsError, match=r"TRIMO_EXTRA_CA_CERTS: .*bundle.crt holds no PEM"):
        Settings.load()


def test_duplicates_in_a_bundle_are_kept_once(tls: dict[str, bytes], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(b"# comment\n" + tls["ca.pem"] + tls["ca.pem"].replace(b"\n", b"\r\n"))
    assert read_certificates(bundle) == [tls["ca.pem"].decode()]


@pytest.fixture(scope="module")
def ca_base(
    docker_client: docker.DockerClient,
    base_image: str,
    tls: dict[str, bytes],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """The base image built with the test CA as extra_ca_certs, under a test tag."""
    pem = tmp_path_factory.mktemp("ca") / "extra.pem"
    pem.write_bytes(tls["ca.pem"])
    tag = f"trimo-test/base-ca:{uuid.uuid4().hex[:8]}"
    with base_context(pem) as ctx:
        result = build_image(docker_client, ctx, tag=tag)
    try:
        yield result.tag, result.context_hash
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(result.tag, force=True)


@pytest.mark.docker
def test_base_with_extra_ca_trusts_what_the_proxy_signed(
    docker_client: docker.DockerClient,
    base_image: str,
    ca_base: tuple[str, str],
    tls: dict[str, bytes],
) -> None:
    tag, digest = ca_base
    assert _probe(docker_client, tag, tls).split() == ["curl=ok", "python=ok"]
    # The session's base image lacks this CA: the same server is refused there.
    assert _probe(docker_client, base_image, tls).split() == ["curl=refused", "python=refused"]
    with base_context(None) as stock:
        assert context_hash(stock, client=docker_client) != digest


@pytest.mark.docker
def test_extra_ca_reaches_project_builds_and_the_login_shell(
    docker_client: docker.DockerClient, ca_base: tuple[str, str]
) -> None:
    tag, _ = ca_base
    image_env = docker_client.images.get(tag).attrs["Config"]["Env"]
    login_env = docker_client.containers.run(
        tag, entrypoint=["/bin/bash", "-lc", "env"], user="agent", remove=True
    ).decode()
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS"):
        assert f"{name}={bundle}" in image_env
        assert f"{name}={bundle}" in login_env.splitlines()
