"""ElbListenerDeployer (ACM) and IamListenerDeployer (IAM) against a real moto server: the listener's
default and SNI certificates swapped, read back, rolled back, and the stored certificates cleaned up
only when no listener holds them. Outcomes are read with plain boto3 clients, not certpilot's."""

from __future__ import annotations

import json

import pytest
from cryptography import x509

from certpilot.deployment import DeployBundle, PermanentDeployError, VerificationError, fingerprint
from certpilot.errors import KeyMismatchError
from certpilot.target_kinds import TargetSettingsError
from connectors.aws import AwsAccount
from connectors.aws_deploy import ElbListenerDeployer, IamListenerDeployer
from lab.moto import MotoServer, make_listener, make_load_balancer
from tests.integration.aws.conftest import REGIONS, Leaves
from tests.keyprobe import leaks

REGION = REGIONS[0]


def _certificates(moto: MotoServer, listener: str) -> tuple[str | None, list[str]]:
    """(default ARN, SNI ARNs) of a listener, read with a plain client."""
    certs = moto.client("elbv2", REGION).describe_listener_certificates(ListenerArn=listener)["Certificates"]
    return (next((c["CertificateArn"] for c in certs if c.get("IsDefault")), None),
            [c["CertificateArn"] for c in certs if not c.get("IsDefault")])


def _fingerprint(moto: MotoServer, arn: str) -> str:
    if ":acm:" in arn:
        body = moto.client("acm", REGION).get_certificate(CertificateArn=arn)["Certificate"]
    else:
        body = moto.client("iam", REGION).get_server_certificate(ServerCertificateName=arn.rsplit("/", 1)[1])[
            "ServerCertificate"]["CertificateBody"]
    return fingerprint(x509.load_pem_x509_certificate(body.encode()))


def _acm_arns(moto: MotoServer) -> set[str]:
    return {c["CertificateArn"] for c in moto.client("acm", REGION).list_certificates()["CertificateSummaryList"]}


def _iam_arns(moto: MotoServer) -> set[str]:
    return {m["Arn"] for m in moto.client("iam", REGION).list_server_certificates()["ServerCertificateMetadataList"]}


def _import(moto: MotoServer, leaves: Leaves, bundle: DeployBundle) -> str:
    return moto.client("acm", REGION).import_certificate(**leaves.import_kwargs(bundle))["CertificateArn"]


@pytest.fixture
def site(moto: MotoServer, leaves: Leaves) -> dict[str, object]:
    """An HTTPS listener whose default (``old``) and SNI (``extra``) certificates someone else imported."""
    old, extra = leaves.bundle("web", "web.example.test"), leaves.bundle("extra", "extra.example.test")
    old_arn, extra_arn = _import(moto, leaves, old), _import(moto, leaves, extra)
    listener = make_listener(moto, make_load_balancer(moto, REGION, "web"), 443, old_arn, sni=(extra_arn,))
    return {"old": old, "old_arn": old_arn, "extra_arn": extra_arn, "listener": listener}


@pytest.mark.parametrize("deployer_class", [ElbListenerDeployer, IamListenerDeployer])
def test_default_certificate_deploy_verify_rollback(moto: MotoServer, account: AwsAccount, leaves: Leaves,
                                                    site: dict[str, object], deployer_class: type) -> None:
    listener, old_arn, extra_arn = site["listener"], site["old_arn"], site["extra_arn"]
    new = leaves.bundle("web", "web.example.test")
    deployer = deployer_class(account, "web-lb", {"listener_arn": listener, "role": "default"})
    acm_before, iam_before = _acm_arns(moto), _iam_arns(moto)

    receipt = deployer.deploy(new)

    default, sni = _certificates(moto, str(listener))
    assert default == receipt.undo["stored"] and default != old_arn
    assert _fingerprint(moto, default) == new.fingerprint
    assert sni == [extra_arn]  # the SNI list survives (moto's modify_listener drops it; certpilot puts it back)
    assert (receipt.previous_fingerprint, receipt.undo["previous"]) == (site["old"].fingerprint, [old_arn])
    if deployer_class is IamListenerDeployer:
        assert default.endswith(f":server-certificate/certpilot/web-lb/web-{new.fingerprint[:16]}")
        assert _acm_arns(moto) == acm_before
    else:
        assert _iam_arns(moto) == iam_before
    proof = deployer.verify(new.fingerprint)
    assert proof.method == "api" and default in proof.detail
    assert deployer.current() == new.fingerprint

    assert leaks(json.dumps(receipt.as_dict()).encode() + repr(deployer).encode(), leaves.keys) == []

    deployer.rollback(receipt)

    assert _certificates(moto, str(listener)) == (old_arn, [extra_arn])
    assert (_acm_arns(moto), _iam_arns(moto)) == (acm_before, iam_before)  # what certpilot stored is gone
    assert deployer.current() == site["old"].fingerprint


def test_verify_fails_exactly_when_the_listener_points_elsewhere(moto: MotoServer, account: AwsAccount,
                                                                 leaves: Leaves, site: dict[str, object]) -> None:
    listener, old_arn = str(site["listener"]), str(site["old_arn"])
    new = leaves.bundle("web", "web.example.test")
    deployer = ElbListenerDeployer(account, "web-lb", {"listener_arn": listener})
    stored = deployer.deploy(new).undo["stored"]
    deployer.verify(new.fingerprint)

    moto.client("elbv2", REGION).modify_listener(ListenerArn=listener, Certificates=[{"CertificateArn": old_arn}])
    with pytest.raises(VerificationError) as failed:
        deployer.verify(new.fingerprint)
    assert (failed.value.expected, failed.value.served) == (new.fingerprint, site["old"].fingerprint)
    assert old_arn in failed.value.reason

    moto.client("elbv2", REGION).modify_listener(ListenerArn=listener, Certificates=[{"CertificateArn": stored}])
    assert deployer.verify(new.fingerprint).fingerprint == new.fingerprint


@pytest.mark.parametrize("deployer_class", [ElbListenerDeployer, IamListenerDeployer])
def test_sni_certificate_replaces_its_previous_entry_and_rolls_back(
        moto: MotoServer, account: AwsAccount, leaves: Leaves, site: dict[str, object], deployer_class: type) -> None:
    listener, old_arn, extra_arn = str(site["listener"]), site["old_arn"], site["extra_arn"]
    api_v1 = leaves.bundle("api", "api.example.test")
    api_v1_arn = _import(moto, leaves, api_v1)  # someone else's SNI entry for the same name
    moto.client("elbv2", REGION).add_listener_certificates(ListenerArn=listener,
                                                           Certificates=[{"CertificateArn": api_v1_arn}])
    deployer = deployer_class(account, "api-sni", {"listener_arn": listener, "role": "sni"})
    api_v2, api_v3 = leaves.bundle("api", "api.example.test"), leaves.bundle("api", "api.example.test")

    first = deployer.deploy(api_v2)
    default, sni = _certificates(moto, listener)
    assert default == old_arn and set(sni) == {extra_arn, first.undo["stored"]}  # v1 replaced, extra untouched
    assert first.undo["previous"] == [api_v1_arn] and first.previous_fingerprint == api_v1.fingerprint
    deployer.verify(api_v2.fingerprint)
    with pytest.raises(VerificationError):
        deployer.verify(api_v1.fingerprint)

    second = deployer.deploy(api_v3)  # replaces certpilot's own entry, found by its tag or IAM path
    assert second.undo["previous"] == [first.undo["stored"]]
    assert set(_certificates(moto, listener)[1]) == {extra_arn, second.undo["stored"]}
    assert deployer.current() == api_v3.fingerprint
    deployer.rollback(second)
    deployer.rollback(first)

    assert _certificates(moto, listener) == (old_arn, [extra_arn, api_v1_arn])
    assert _acm_arns(moto) == {old_arn, extra_arn, api_v1_arn} and _iam_arns(moto) == set()


def test_remove_takes_sni_entries_off_but_refuses_a_default_certificate_in_use(
        moto: MotoServer, account: AwsAccount, leaves: Leaves, site: dict[str, object]) -> None:
    listener, old_arn, extra_arn = str(site["listener"]), site["old_arn"], site["extra_arn"]
    sni = IamListenerDeployer(account, "api-sni", {"listener_arn": listener, "role": "sni"})
    sni.deploy(leaves.bundle("api", "api.example.test"))
    default = ElbListenerDeployer(account, "web-lb", {"listener_arn": listener, "role": "default"})
    stored = default.deploy(leaves.bundle("web", "web.example.test")).undo["stored"]

    removal = sni.remove()
    assert _certificates(moto, listener) == (stored, [extra_arn]) and len(_iam_arns(moto)) == 1  # kept
    assert sni.current() is None
    sni.restore(removal)
    assert sni.current() == removal.fingerprint and len(_certificates(moto, listener)[1]) == 2
    sni.purge(sni.remove())
    assert _certificates(moto, listener) == (stored, [extra_arn]) and _iam_arns(moto) == set()

    with pytest.raises(PermanentDeployError, match="needs a default certificate") as refused:
        default.remove()  # moto would delete it from under the listener
    assert listener in str(refused.value)
    assert stored in _acm_arns(moto) and _certificates(moto, listener)[0] == stored


def test_a_mismatched_key_changes_neither_listener_nor_stores(moto: MotoServer, account: AwsAccount,
                                                              leaves: Leaves, site: dict[str, object]) -> None:
    listener = str(site["listener"])
    new, other = leaves.bundle("web", "web.example.test"), leaves.bundle("x", "x.example.test")
    before = (_certificates(moto, listener), _acm_arns(moto), _iam_arns(moto))
    for deployer_class in (ElbListenerDeployer, IamListenerDeployer):
        deployer = deployer_class(account, "web-lb", {"listener_arn": listener})
        with pytest.raises(KeyMismatchError, match="matches none of the certificates"):  # moto would take it
            deployer.deploy(DeployBundle(new.name, new.certificate, new.chain, other.key_pem))
    assert (_certificates(moto, listener), _acm_arns(moto), _iam_arns(moto)) == before


def test_settings_are_checked(account: AwsAccount) -> None:
    listener = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:listener/app/web/1/2"
    with pytest.raises(PermanentDeployError, match="role must be"):
        ElbListenerDeployer(account, "t", {"listener_arn": listener, "role": "both"})
    with pytest.raises(TargetSettingsError, match="unknown aws-elbv2 setting.s. certificate_arn") as unknown:
        ElbListenerDeployer(account, "t", {"listener_arn": listener, "certificate_arn": "x"})
    assert unknown.value.valid_keys == ("listener_arn", "region", "role")
    with pytest.raises(PermanentDeployError, match="not us-east-2"):
        IamListenerDeployer(account, "t", {"listener_arn": listener, "region": "us-east-2"})
    with pytest.raises(PermanentDeployError, match=r"needs the setting\(s\) listener_arn"):
        IamListenerDeployer(account, "t", {})
