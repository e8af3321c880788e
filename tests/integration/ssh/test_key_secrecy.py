"""Private keys never leave the files they belong in: after deploys, rollbacks and failed deploys to
nginx and haproxy, no key (in any encoding, see tests/keyprobe.py) appears in a Receipt, an exception's
text or a log record at any level, paramiko's own DEBUG records included. Commands are logged at DEBUG,
so a key put on a command line (visible in `ps`) would be caught here too."""

from __future__ import annotations

import json
import logging
import pickle

import pytest

from certpilot.deployment import PermanentDeployError, Receipt
from connectors.ssh import SshConnection
from connectors.ssh_deploy import HaproxyDeployer, NginxDeployer
from lab.haproxy import HaproxyInstance
from lab.nginx import NginxInstance
from tests.integration.ssh.conftest import Pki
from tests.keyprobe import leaks


def test_keys_appear_in_no_receipt_error_or_log(nginx: NginxInstance, haproxy: HaproxyInstance, ssh: SshConnection,
                                                 pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receipts: list[Receipt] = []
    errors: list[BaseException] = []
    web = NginxDeployer("web-secret", ssh, {**nginx.deploy_settings("secret.test"), "verify_trust": pki.trust_pem})
    lb = HaproxyDeployer("lb-secret", ssh, {**haproxy.deploy_settings(), "verify_trust": pki.trust_pem})

    for target in (web, lb):
        receipt = target.deploy(pki.bundle("secret.test" if target is web else "lb.test"))
        target.verify(receipt.fingerprint)
        target.rollback(receipt)
        assert receipt.previous_fingerprint is not None
        target.verify(receipt.previous_fingerprint)
        receipts.append(receipt)
    nginx.write_config(extra_http="    certpilot_bogus_directive on;\n")
    try:
        with pytest.raises(PermanentDeployError) as broken:
            web.deploy(pki.bundle("secret.test"))
    finally:
        nginx.write_config()
    errors.append(broken.value)
    stray = HaproxyDeployer("lb-stray", ssh, {**haproxy.deploy_settings(),
                                              "pem_path": str(haproxy.pem_path.with_name("stray.pem"))})
    with pytest.raises(PermanentDeployError) as refused:
        stray.deploy(pki.bundle("lb.test"))
    errors.append(refused.value)

    haystack = b"".join([
        *(json.dumps(r.as_dict()).encode() + repr(r).encode() + pickle.dumps(r) for r in receipts),
        *(str(e).encode() + repr(e).encode() + repr(e.args).encode() + pickle.dumps(e) for e in errors),
        *(f"{rec.name} {rec.getMessage()} {rec.args!r} {rec.exc_text or ''}".encode() for rec in caplog.records),
    ])
    assert len(caplog.records) > 10  # the log was really captured, paramiko's DEBUG records included
    assert len(pki.keys) >= 6
    assert leaks(haystack, pki.keys) == []
