"""Flow runs against a peer that accepts and never answers (the fault proxy's black hole, TCP mode): the
renew-certificate run of a certificate whose ACME CA is black-holed, and the deploy-certificate run of one
whose target's SSH host is. Each run fails within its timeouts (every retry included) and its state names
what did not answer, host:port. tests/integration/test_black_holes.py covers the connectors one by one."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from blocks.issuers import AcmeIssuerBlock, _shared_http01_responder
from blocks.ssh import SshHostBlock
from certpilot import managed, targets
from certpilot.database import read_session, write_session
from flows.deploy import deploy_certificate
from flows.renew import renew_certificate
from lab.fault_proxy import FaultProxy, Faults
from lab.ports import free_port
from lab.sshd import generate_client_key, openssh_private_text, openssh_public_line
from tasks.deployment import deploy_target
from tasks.renewal import RETRIES, configure_retries
from tests.flows.fleet_fixtures import inventory, ring  # noqa: F401 (fixtures)
from tests.integration.acme_faults import ACTOR, expiring_estate

TIMEOUT = 1.0
ISSUER_SLOT = 2.5  # an order's slot of its issuer's concurrency limit: Prefect's concurrency() takes up to 2 s
SLACK = 8.0  # flow and task run bookkeeping, thread start-up, the machine being shared


@pytest.fixture
def hole() -> Iterator[FaultProxy]:
    """A loopback port that accepts every connection, reads, and never answers (nothing behind it)."""
    with FaultProxy(upstream=("127.0.0.1", free_port()), faults=Faults(black_hole=1.0), mode="tcp") as proxy:
        yield proxy


@pytest.fixture
def quick_retries() -> Iterator[None]:
    """Tiny backoffs for the renewal and deploy tasks' retries (each retry still happens)."""
    configure_retries(0.01)
    delays = deploy_target.retry_delay_seconds
    deploy_target.retry_delay_seconds = [0.01] * len(delays or [])  # type: ignore[arg-type,operator]
    yield
    deploy_target.retry_delay_seconds = delays
    configure_retries(5)


def test_a_black_holed_ca_fails_the_renew_certificate_run(inventory: sa.Engine, hole: FaultProxy,  # noqa: F811
                                                          quick_retries: None) -> None:
    http_port = free_port()
    AcmeIssuerBlock(directory_url=f"http://{hole.host}:{hole.port}/dir", timeout_seconds=TIMEOUT,
                    http01_address="127.0.0.1", http01_port=http_port).save("black-hole", overwrite=True)
    expiring_estate(inventory, ring, ["hole-ca"], "certpilot.test", issuer="acme-issuer/black-hole")
    started = time.monotonic()
    try:
        state = renew_certificate(name="hole-ca", return_state=True)
    finally:
        _shared_http01_responder("127.0.0.1", http_port).stop()
    took = time.monotonic() - started
    assert state.is_failed()
    where = f"127.0.0.1:{hole.port}"
    assert where in (state.message or "") and "no answer within 1 s" in (state.message or ""), state.message
    assert took < (1 + RETRIES) * (TIMEOUT + ISSUER_SLOT) + SLACK, f"took {took:.1f} s"
    assert hole.stats.injected["black_hole"] >= 1 + RETRIES  # the first try and every retry reached it
    with read_session(inventory) as session:
        row = managed.get(session, "hole-ca")
        assert row.last_error is not None and where in row.last_error  # recorded, naming it


def test_a_black_holed_ssh_host_fails_the_deploy_certificate_run(inventory: sa.Engine,  # noqa: F811
                                                                 hole: FaultProxy, quick_retries: None) -> None:
    host_key = generate_client_key()  # the key the host would have: it never gets to show one
    SshHostBlock(address=hole.host, port=hole.port, user="deploy",
                 private_key=openssh_private_text(generate_client_key()),
                 known_hosts=f"[{hole.host}]:{hole.port} {openssh_public_line(host_key)}",
                 connect_timeout=TIMEOUT, command_timeout=TIMEOUT).save("black-hole", overwrite=True)
    expiring_estate(inventory, ring, ["hole-ssh"], "certpilot.test", issuer="private-ca/none")
    with write_session(inventory) as session:
        targets.add(session, "hole-ssh", "web-hole", "ssh-nginx", "ssh-host/black-hole",
                    {"certificate_path": "/etc/nginx/site.pem", "key_path": "/etc/nginx/site.key"}, ACTOR)
    started = time.monotonic()
    state = deploy_certificate(name="hole-ssh", return_state=True)
    took = time.monotonic() - started
    assert state.is_failed()
    message = state.message or ""
    assert f"127.0.0.1:{hole.port}" in message and "web-hole" in message, message
    attempts = 1 + len(deploy_target.retry_delay_seconds or [])  # type: ignore[arg-type]
    assert took < attempts * 2 * TIMEOUT + SLACK, f"took {took:.1f} s"  # connect, then the banner: a timeout each
