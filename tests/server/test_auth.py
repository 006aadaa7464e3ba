"""Access control: bearer tokens on operator calls (optionally on inference), TLS and client
certificates, against real servers. Certificates are made by the `openssl` command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from convserve.client import Client, ClientError
from convserve.contracts.errors import ConfigError
from convserve.server import config as config_module
from tests.servers import images, running_server

TOKEN = "s3cret-token-123"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=convserve test CA", cwd=folder)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=folder)
    (folder / "token").write_text(TOKEN + "\n")
    return folder


def test_the_token_is_redacted_and_inconsistent_settings_are_refused(pki: Path) -> None:
    described = config_module.ServerConfig(auth_token=TOKEN).describe()
    assert "auth_token = <redacted>" in described and TOKEN not in described
    assert config_module.ServerConfig(auth_token_file=str(pki / "token")).token() == TOKEN
    for argv, message in (
            (["--auth-inference", "true"], "auth_inference=True is out of range: expected only "
                                           "with a token"),
            (["--tls-cert-file", str(pki / "server.pem")], "set together with tls_key_file"),
            (["--auth-token-file", str(pki / "missing")], "expected a readable file"),
            (["--auth-token", "x", "--auth-token-file", str(pki / "token")], "not both")):
        with pytest.raises(ConfigError, match=message):
            config_module.parse(argv, {})


@pytest.mark.slow
def test_operator_calls_need_the_token_over_tls(pki: Path, store_with_model) -> None:
    store, datasets = store_with_model
    with running_server(store, datasets, "--auth-token-file", str(pki / "token"),
                        "--tls-cert-file", str(pki / "server.pem"),
                        "--tls-key-file", str(pki / "server.key"),
                        "--log-level", "DEBUG") as server:
        ca = str(pki / "ca.pem")
        with Client(server.address, tls_ca_file=ca, retries=0) as anonymous:
            assert anonymous.predict(images(1)).version == 1  # inference stays open
            with pytest.raises(ClientError) as missing:
                anonymous.train("digits")
            assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "needs a bearer token" in missing.value.details
            with pytest.raises(ClientError) as missing:
                anonymous.promote(1, "no token")
            assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.address, tls_ca_file=ca, token="wrong", retries=0) as impostor, \
                pytest.raises(ClientError) as wrong:
            impostor.promote(1, "wrong token")
        assert wrong.value.code == grpc.StatusCode.PERMISSION_DENIED
        with Client(server.address, tls_ca_file=ca, token=TOKEN) as operator:
            assert operator.promote(1, "with the token").version == 1
        with Client(server.address, retries=0, timeout=5) as plaintext, \
                pytest.raises(ClientError) as refused:
            plaintext.predict(images(1))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert not any(TOKEN in line for line in server.stderr_lines)


@pytest.mark.slow
def test_protected_inference_with_client_certificates(pki: Path, store_with_model) -> None:
    store, datasets = store_with_model
    with running_server(store, datasets, "--auth-token", TOKEN, "--auth-inference", "true",
                        "--tls-cert-file", str(pki / "server.pem"),
                        "--tls-key-file", str(pki / "server.key"),
                        "--tls-client-ca-file", str(pki / "ca.pem")) as server:
        certified = {"tls_ca_file": str(pki / "ca.pem"), "tls_cert_file": str(pki / "client.pem"),
                     "tls_key_file": str(pki / "client.key")}
        with Client(server.address, token=TOKEN, **certified) as client:
            assert client.predict(images(2)).version == 1
        with Client(server.address, retries=0, **certified) as no_token, \
                pytest.raises(ClientError) as missing:
            no_token.predict(images(1))
        assert missing.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.address, token=TOKEN, tls_ca_file=str(pki / "ca.pem"), retries=0,
                    timeout=5) as no_certificate, pytest.raises(ClientError) as refused:
            no_certificate.predict(images(1))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    log = "".join(server.stderr_lines)
    assert "auth_token = <redacted>" in log and TOKEN not in log  # the start-up configuration
