"""blocks.notifications.EmailNotification against a real SMTP server (aiosmtpd) on loopback: plain,
STARTTLS and implicit TLS, with a login; a wrong password, an untrusted server certificate, a closed
port and a server that never answers each fail with a certpilot error naming the server, within the
block's timeout, and never showing the password. No Prefect server is needed to send."""

from __future__ import annotations

import ssl
import time

import pytest

from blocks.notifications import EmailNotification
from certpilot.errors import PermanentError, TransientError
from lab.keyvault import make_server_identity
from lab.receivers import BlackHole, SmtpReceiver, closed_port


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ssl.SSLContext]:
    ca_file, cert_file, key_file = make_server_identity(tmp_path_factory.mktemp("smtp-tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return ca_file.read_text(), context


def _block(port: int, **fields: object) -> EmailNotification:
    values: dict[str, object] = {"smtp_host": "127.0.0.1", "smtp_port": port, "security": "plain",
                                 "from_address": "certpilot@example.test",
                                 "to_addresses": ["ops@example.test", "oncall@example.test"], "timeout_seconds": 2}
    return EmailNotification(**(values | fields))


def test_plain() -> None:
    with SmtpReceiver() as smtp:
        _block(smtp.port).notify("www.example.test expires in 3 days\nserved at tls://10.0.0.1:443",
                                 subject="[certpilot CRITICAL] expiring www.example.test")
        [message] = smtp.wait_for(1)
    assert message["Subject"] == "[certpilot CRITICAL] expiring www.example.test"
    assert message["From"] == "certpilot@example.test" and message["To"] == "ops@example.test, oncall@example.test"
    assert message.get_content().splitlines() == ["www.example.test expires in 3 days", "served at tls://10.0.0.1:443"]
    assert smtp.envelopes == [("certpilot@example.test", ["ops@example.test", "oncall@example.test"])]


def test_starttls_with_a_login(identity: tuple[str, ssl.SSLContext]) -> None:
    ca_pem, context = identity
    with SmtpReceiver(tls_context=context, credentials=("certpilot", "s3cret-pass")) as smtp:
        block = _block(smtp.port, security="starttls", trusted_ca_pem=ca_pem, username="certpilot",
                       password="s3cret-pass")
        block.notify("body", subject="over STARTTLS")
        assert [str(m["Subject"]) for m in smtp.wait_for(1)] == ["over STARTTLS"]
        with pytest.raises(PermanentError, match=r"127.0.0.1:\d+ rejected the login of 'certpilot'") as raised:
            _block(smtp.port, security="starttls", trusted_ca_pem=ca_pem, username="certpilot",
                   password="wrong-pass").notify("body")
        assert "wrong-pass" not in str(raised.value)
        with pytest.raises(PermanentError, match="TLS failed"):  # the system's trust does not know the lab CA
            _block(smtp.port, security="starttls").notify("body")
        with pytest.raises(PermanentError, match="answered 530"):  # plain where STARTTLS is required
            _block(smtp.port).notify("body")
    assert len(smtp.messages) == 1


def test_implicit_tls(identity: tuple[str, ssl.SSLContext]) -> None:
    ca_pem, context = identity
    with SmtpReceiver(implicit_tls=context) as smtp:
        _block(smtp.port, security="ssl", trusted_ca_pem=ca_pem).notify("body", subject="over TLS")
        assert [str(m["Subject"]) for m in smtp.wait_for(1)] == ["over TLS"]


def test_a_closed_port_or_a_silent_server_fails_within_the_timeout() -> None:
    with pytest.raises(TransientError, match=r"SMTP server 127.0.0.1:\d+ is unreachable: ConnectionRefusedError"):
        _block(closed_port()).notify("body")
    with BlackHole() as hole:
        started = time.monotonic()
        with pytest.raises(TransientError, match=rf"SMTP server 127.0.0.1:{hole.port} did not answer within 1 s"):
            _block(hole.port, timeout_seconds=1).notify("body")
        assert time.monotonic() - started < 3


def test_bad_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="is not an e-mail address"):
        _block(25, from_address="certpilot")
    with pytest.raises(ValueError, match="to_addresses"):
        _block(25, to_addresses=[])
    with pytest.raises(ValueError, match="security"):
        _block(25, security="tls1.0")
