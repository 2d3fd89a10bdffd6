"""A `rediss://` broker: TLS with the server's certificate checked, or refused.

kombu, given a `rediss://` URL without TLS options, connects without checking the certificate
(it only logs a warning). graftq always passes `ssl_cert_reqs=CERT_REQUIRED` to Celery's
`broker_use_ssl`, and refuses a URL that asks for less.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.celery_app import configure
from jobs.cli import cli
from jobs.settings import Settings, SettingsError
from tests.conftest import free_port, graftq_argv
from tests.redis_server import queued_messages


@pytest.mark.parametrize("reqs", ["none", "CERT_NONE", "optional"])
def test_a_tls_url_that_would_not_check_the_server_is_refused(reqs):
    with pytest.raises(SettingsError, match=f"ssl_cert_reqs={reqs}: the Redis server's certificate would not be"):
        Settings(broker_url=f"rediss://:secret@redis.example:6380/0?ssl_cert_reqs={reqs}")


def test_the_refusal_is_a_usage_error_that_hides_the_password():
    result = CliRunner().invoke(cli, ["status"],
                                env={"GRAFTQ_BROKER_URL": "rediss://:hunter2@redis.example:6380/0?ssl_cert_reqs=none"})
    assert result.exit_code == 2 and "ssl_cert_reqs=required" in result.output
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_tls_options_map_to_celery_broker_use_ssl(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    app = configure(Settings(broker_url=f"rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"))
    try:
        expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
        assert app.conf.broker_use_ssl == expected
        assert app.conf.broker_url == "rediss://:pw@redis.example:6380/0"  # kombu would let URL options win
        assert app.connection_for_write().ssl == expected
        # Without options: the certificate is still checked (against the system's CAs).
        app = configure(Settings(broker_url="rediss://redis.example:6380/0"))
        assert app.connection_for_write().ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        assert configure(Settings(broker_url="redis://127.0.0.1:6379/0")).conf.broker_use_ssl is None
    finally:
        configure(Settings())
    with pytest.raises(SettingsError, match="ssl_ca_certs=.* is not a file"):
        Settings(broker_url=f"rediss://h:1/0?ssl_ca_certs={tmp_path / 'absent.pem'}")
    with pytest.raises(SettingsError, match="unknown TLS option 'ssl_verify'"):
        Settings(broker_url="rediss://h:1/0?ssl_verify=0")


def _certificate_authority(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return key, cert


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that speaks only TLS, with a certificate from a CA of this test: (port, CA file)."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("needs redis-server and openssl")
    ca_key, ca = _certificate_authority(tmp_path, "graftq-test-ca")
    key, csr, cert = tmp_path / "server.key", tmp_path / "server.csr", tmp_path / "server.pem"
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(tmp_path / "ext.cnf")],
                   check=True, capture_output=True)
    port = free_port()
    process = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                                "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
                                "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca), socket_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.skip("this redis-server does not speak TLS (built without it?)")
            time.sleep(0.1)
    yield port, ca, client
    process.kill()
    process.wait()


def test_submit_over_tls_checks_the_servers_certificate(tmp_path, tls_redis, graftq_env):
    from worker.launcher import broker_job_ids

    port, ca, client = tls_redis
    batch = tmp_path / "b.yaml"
    batch.write_text("base_model: random:t5-tiny\njobs: [{task: a, kind: create, extension: lora}]\n")
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    result = subprocess.run(graftq_argv("submit", str(batch)), cwd=tmp_path, env={**graftq_env, "GRAFTQ_BROKER_URL": url},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(queued_messages(client, "graftq")) == 1
    # The reaper reads the queues over the same verified connection.
    assert len(broker_job_ids(Settings(broker_url=url))) == 1

    # A server whose certificate this CA did not sign is not trusted: nothing is submitted.
    _, other_ca = _certificate_authority(tmp_path, "someone-else")
    impostor = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other_ca}"
    refused = subprocess.run(graftq_argv("submit", str(batch)), cwd=tmp_path,
                             env={**graftq_env, "GRAFTQ_BROKER_URL": impostor, "GRAFTQ_DATABASE_URL":
                                  f"sqlite:///{tmp_path / 'other.db'}"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "cannot reach the broker" in refused.stderr
    assert "certificate verify failed" in refused.stderr
    assert len(queued_messages(client, "graftq")) == 1
