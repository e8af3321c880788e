"""fetch_chain and wait_until_served on real TLS over loopback: the farm, and a server that switches its
certificate while the verifier handshakes with it."""

from __future__ import annotations

import pickle
import ssl
import time
from pathlib import Path

import pytest

from certpilot.deployment import Verification, VerificationError
from certpilot.errors import EndpointTimeoutError, EndpointUnreachableError, HandshakeFailedError, TransientError
from connectors.tls_verify import (TlsHandshakeError, TlsProbeError, TlsTimeoutError, TlsUnreachableError, fetch_chain,
                                   wait_until_served)
from lab.tls_farm import TlsFarm
from tests.integration.tls.conftest import Identity, SwitchingServer, unused_port


@pytest.fixture(scope="module")
def identities(farm: TlsFarm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    directory: Path = tmp_path_factory.mktemp("identities")
    return {"old": Identity(directory, farm.ca, ["site.example.test"], "old"),
            "new": Identity(directory, farm.ca, ["site.example.test", "*.site.example.test"], "new"),
            "bare": Identity(directory, farm.ca, ["site.example.test"], "bare", with_intermediate=False)}


# --- fetch_chain ---------------------------------------------------------------------------------------------


def test_fetch_chain_returns_the_chain_as_presented(farm: TlsFarm) -> None:
    endpoint = farm.of_kind("good")[0]
    presented = fetch_chain(endpoint.host, endpoint.port, timeout=2.0)
    assert presented.chain == endpoint.chain
    assert presented.fingerprint == endpoint.fingerprint
    assert presented.tls_version == "TLSv1.3" and presented.cipher.startswith("TLS_")


@pytest.mark.parametrize(("kind", "error_kind", "message"), [
    ("silent", "silent", "no answer to the TLS ClientHello within 0.5 s"),
    ("slow", "slow", "handshake not complete within 0.5 s"),
    ("plaintext", "not-tls", "not TLS: the server answered b'HTTP/1.1 400 Bad'"),
    ("garbage", "not-tls", "not TLS: the server answered b'\\xa5"),
    ("huge-chain", "too-large", "handshake still incomplete after "),
])
def test_fetch_chain_says_what_went_wrong(farm: TlsFarm, kind: str, error_kind: str, message: str) -> None:
    endpoint = farm.of_kind(kind)[0]
    started = time.monotonic()
    with pytest.raises(TlsProbeError) as caught:
        fetch_chain(endpoint.host, endpoint.port, sni="x.test", timeout=0.5)
    assert time.monotonic() - started < 1.0
    assert caught.value.kind == error_kind
    assert str(caught.value).startswith(f"127.0.0.1:{endpoint.port} sni=x.test: {message}")
    _named_by_cause(caught.value, endpoint.port)


def _named_by_cause(error: TlsProbeError, port: int) -> None:
    """The error is the class of its cause, carries host and port (and the cause's own field) as attributes,
    is transient, and survives pickling (Prefect persists a failed task's exception) unchanged."""
    cause = {"refused": EndpointUnreachableError, "silent": EndpointTimeoutError, "slow": EndpointTimeoutError,
             "not-tls": HandshakeFailedError, "too-large": HandshakeFailedError, "alert": HandshakeFailedError}
    assert isinstance(error, cause[error.kind]) and isinstance(error, TransientError)
    assert (error.host, error.port) == ("127.0.0.1", port)
    if isinstance(error, EndpointTimeoutError):
        assert isinstance(error, TlsTimeoutError) and error.timeout == 0.5
    elif isinstance(error, EndpointUnreachableError):
        assert isinstance(error, TlsUnreachableError) and error.cause == error.kind
    else:
        assert isinstance(error, TlsHandshakeError) and error.reason == error.detail
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_fetch_chain_on_a_closed_port_is_refused() -> None:
    port = unused_port()
    with pytest.raises(TlsProbeError, match=rf"^127\.0\.0\.1:{port}: connection refused") as caught:
        fetch_chain("127.0.0.1", port, timeout=1.0)
    assert caught.value.kind == "refused"
    _named_by_cause(caught.value, port)


def test_fetch_chain_reports_a_handshake_alert(identities: dict[str, Identity]) -> None:
    context = identities["old"].context()

    def refuse_unknown_names(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        return None if name == "site.example.test" else ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    context.sni_callback = refuse_unknown_names
    with SwitchingServer(lambda _n: context) as server:
        served = fetch_chain("127.0.0.1", server.port, sni="site.example.test")
        assert served.fingerprint == identities["old"].fingerprint
        with pytest.raises(TlsProbeError, match="sni=other.test: TLS alert from the server: unrecognized name"
                           ) as caught:
            fetch_chain("127.0.0.1", server.port, sni="other.test")
    assert caught.value.kind == "alert"
    _named_by_cause(caught.value, server.port)


# --- wait_until_served ---------------------------------------------------------------------------------------


def test_waits_until_the_new_certificate_is_served_consistently(farm: TlsFarm, identities: dict[str, Identity]) -> None:
    """Old certificate for 0.3 s, then old and new alternating (old workers draining) for 0.3 s, then new."""
    old, new = identities["old"].context(), identities["new"].context()
    started = time.monotonic()

    def choose(n: int) -> ssl.SSLContext:
        age = time.monotonic() - started
        if age < 0.3:
            return old
        if age < 0.6:
            return new if n % 2 else old
        return new

    with SwitchingServer(choose) as server:
        result = wait_until_served("127.0.0.1", server.port, identities["new"].fingerprint, target="web-1",
                                   sni="www.site.example.test", trust=[farm.ca.root], consecutive=5, timeout=5.0)
    elapsed = time.monotonic() - started
    assert isinstance(result, Verification)
    assert (result.target, result.fingerprint, result.method) == ("web-1", identities["new"].fingerprint, "tls")
    assert "5 consecutive handshakes" in result.detail and "hostname www.site.example.test matches" in result.detail
    assert elapsed >= 0.6  # the alternating phase never gives 5 in a row


def test_wrong_certificate_fails_with_what_was_served(identities: dict[str, Identity]) -> None:
    old = identities["old"].context()
    with SwitchingServer(lambda _n: old) as server, pytest.raises(VerificationError) as caught:
        wait_until_served("127.0.0.1", server.port, identities["new"].fingerprint, target="web-1", timeout=0.5)
    error = caught.value
    assert (error.target, error.expected, error.served) == ("web-1", identities["new"].fingerprint,
                                                            identities["old"].fingerprint)
    assert error.reason.startswith(f"127.0.0.1:{server.port} served {identities['old'].fingerprint[:16]}… "
                                   f"(CN=site.example.test,O=certpilot tls farm) on all ")
    assert error.reason.endswith(f"handshakes in 0.5 s, never {identities['new'].fingerprint[:16]}…")


def test_a_certificate_served_only_some_of_the_time_is_not_enough(identities: dict[str, Identity]) -> None:
    old, new = identities["old"].context(), identities["new"].context()
    with SwitchingServer(lambda n: new if n % 2 else old) as server, pytest.raises(VerificationError) as caught:
        wait_until_served("127.0.0.1", server.port, identities["new"].fingerprint, target="t", timeout=0.5)
    assert " of " in caught.value.reason and "never 5 in a row" in caught.value.reason


def test_incomplete_chain_fails(farm: TlsFarm, identities: dict[str, Identity]) -> None:
    bare = identities["bare"]
    with SwitchingServer(lambda _n: bare.context()) as server:
        with pytest.raises(VerificationError) as with_trust:
            wait_until_served("127.0.0.1", server.port, bare.fingerprint, target="t", trust=[farm.ca.root],
                              consecutive=2, timeout=2.0)
        with pytest.raises(VerificationError) as without_trust:
            wait_until_served("127.0.0.1", server.port, bare.fingerprint, target="t", consecutive=2, timeout=2.0)
        # Trusting the intermediate itself makes the lone leaf complete.
        wait_until_served("127.0.0.1", server.port, bare.fingerprint, target="t", trust=[farm.ca.intermediate],
                          consecutive=2, timeout=2.0)
    issuer = "CN=Farm Issuing CA,O=certpilot tls farm"
    assert with_trust.value.reason == (f"127.0.0.1:{server.port}: chain incomplete: no intermediate or trust "
                                       f"anchor for issuer {issuer}")
    assert without_trust.value.reason == (f"127.0.0.1:{server.port}: chain incomplete: no intermediate for issuer "
                                          f"{issuer}")
    assert with_trust.value.served == bare.fingerprint


def test_a_chain_to_another_root_fails(farm: TlsFarm, other_ca) -> None:  # noqa: ANN001
    endpoint = farm.of_kind("good")[0]
    with pytest.raises(VerificationError, match="chain incomplete: no intermediate or trust anchor for issuer "
                                                "CN=Farm Root CA,O=certpilot tls farm"):
        wait_until_served(endpoint.host, endpoint.port, endpoint.fingerprint or "", target="t",
                          trust=[other_ca.root], consecutive=1, timeout=2.0)


def test_hostname_mismatch_fails(farm: TlsFarm) -> None:
    endpoint = farm.of_kind("good")[0]
    assert endpoint.fingerprint
    expected_name = "ep00000.farm.test"
    ok = wait_until_served(endpoint.host, endpoint.port, endpoint.fingerprint, target="t", hostname=expected_name,
                           trust=[farm.ca.root], consecutive=2, timeout=2.0)
    assert f"hostname {expected_name} matches" in ok.detail
    with pytest.raises(VerificationError) as caught:
        wait_until_served(endpoint.host, endpoint.port, endpoint.fingerprint, target="t", hostname="www.other.test",
                          consecutive=2, timeout=2.0)
    assert caught.value.reason == f"127.0.0.1:{endpoint.port}: hostname www.other.test not in SANs [{expected_name}]"


def test_nothing_listening_fails_within_its_timeout() -> None:
    port = unused_port()
    started = time.monotonic()
    with pytest.raises(VerificationError) as caught:
        wait_until_served("127.0.0.1", port, "ab" * 32, target="t", timeout=0.5)
    assert time.monotonic() - started < 1.0
    assert caught.value.served is None
    assert caught.value.reason == (f"nothing served a certificate on 127.0.0.1:{port} within 0.5 s: "
                                   "connection refused (nothing listening)")


def test_a_silent_endpoint_fails_within_its_timeout(farm: TlsFarm) -> None:
    endpoint = farm.of_kind("silent")[0]
    started = time.monotonic()
    with pytest.raises(VerificationError, match="nothing served a certificate .* no answer to the TLS ClientHello"):
        wait_until_served(endpoint.host, endpoint.port, "ab" * 32, target="t", timeout=0.7)
    assert time.monotonic() - started < 1.2
