"""AcmDeployer against a real moto server: re-import into the same ARN, read-back verification, rollback
through a lookup over real keys, and the checks moto does not make (key match, chain linkage, a
certificate in use is not deleted). Every outcome is observed through moto's own API."""

from __future__ import annotations

import json

import pytest
from cryptography import x509

from certpilot.deployment import DeployBundle, PermanentDeployError, VerificationError, fingerprint
from certpilot.errors import KeyMismatchError
from certpilot.sample_estate import make_ca
from connectors.aws import AwsAccount
from connectors.aws_deploy import AcmDeployer
from lab.moto import MotoServer, make_listener, make_load_balancer
from tests.integration.aws.conftest import REGIONS, Leaves
from tests.keyprobe import leaks

REGION = REGIONS[0]


def _held(moto: MotoServer, arn: str) -> str:
    """The fingerprint ACM holds at ``arn``, read with a plain client (not certpilot's)."""
    body = moto.client("acm", REGION).get_certificate(CertificateArn=arn)["Certificate"]
    return fingerprint(x509.load_pem_x509_certificate(body.encode()))


def _arns(moto: MotoServer) -> list[str]:
    return [c["CertificateArn"] for c in moto.client("acm", REGION).list_certificates()["CertificateSummaryList"]]


@pytest.fixture
def existing(moto: MotoServer, leaves: Leaves) -> tuple[str, DeployBundle]:
    """An ACM certificate imported by someone else, whose key certpilot's keystore (the lookup) has."""
    old = leaves.bundle("shop", "shop.example.test")
    return moto.client("acm", REGION).import_certificate(**leaves.import_kwargs(old))["CertificateArn"], old


def test_deploy_verify_and_rollback_reimport_in_place(moto: MotoServer, account: AwsAccount, leaves: Leaves,
                                                      existing: tuple[str, DeployBundle]) -> None:
    arn, old = existing
    new = leaves.bundle("shop", "shop.example.test")
    deployer = AcmDeployer(account, "shop-acm", {"certificate_arn": arn}, lookup=leaves.lookup)
    assert deployer.current() == old.fingerprint

    receipt = deployer.deploy(new)

    assert _held(moto, arn) == new.fingerprint and _arns(moto) == [arn]
    assert (receipt.previous_fingerprint, receipt.undo["certificate_arn"], receipt.undo["created"]) == \
        (old.fingerprint, arn, False)
    proof = deployer.verify(new.fingerprint)
    assert (proof.method, proof.fingerprint) == ("api", new.fingerprint) and arn in proof.detail
    with pytest.raises(VerificationError) as wrong:
        deployer.verify(old.fingerprint)
    assert wrong.value.served == new.fingerprint

    deployer.rollback(receipt)

    assert _held(moto, arn) == old.fingerprint and _arns(moto) == [arn]
    assert deployer.current() == old.fingerprint
    deployer.verify(old.fingerprint)


@pytest.mark.parametrize("lookup", ["none", "unknown"])
def test_rollback_without_the_previous_key_is_refused_and_changes_nothing(
        moto: MotoServer, account: AwsAccount, leaves: Leaves, existing: tuple[str, DeployBundle], lookup: str) -> None:
    arn, _ = existing
    new = leaves.bundle("shop", "shop.example.test")
    deployer = AcmDeployer(account, "shop-acm", {"certificate_arn": arn},
                           lookup=None if lookup == "none" else (lambda fp: None))
    receipt = deployer.deploy(new)

    with pytest.raises(PermanentDeployError, match="not in certpilot's keystore.*ACM does not export") as refused:
        deployer.rollback(receipt)

    assert arn in str(refused.value)
    assert _held(moto, arn) == new.fingerprint


def test_a_key_that_does_not_match_is_refused_before_anything_changes(
        moto: MotoServer, account: AwsAccount, leaves: Leaves, existing: tuple[str, DeployBundle]) -> None:
    arn, old = existing
    new = leaves.bundle("shop", "shop.example.test")
    other = leaves.bundle("other", "other.example.test")
    for deployer in (AcmDeployer(account, "shop-acm", {"certificate_arn": arn}),
                     AcmDeployer(account, "fresh-acm", {"region": REGION})):
        with pytest.raises(KeyMismatchError, match="matches none of the certificates") as refused:
            deployer.deploy(DeployBundle(new.name, new.certificate, new.chain, other.key_pem))  # moto would take it
        assert new.fingerprint[:16] in str(refused.value)
        assert leaks(str(refused.value).encode(), leaves.keys) == []

    assert _held(moto, arn) == old.fingerprint and _arns(moto) == [arn]


def test_a_chain_that_does_not_link_is_refused_before_anything_changes(
        moto: MotoServer, account: AwsAccount, leaves: Leaves, existing: tuple[str, DeployBundle]) -> None:
    arn, old = existing
    new = leaves.bundle("shop", "shop.example.test")
    stranger = make_ca("Look-alike Issuing CA")
    unlinked = DeployBundle(new.name, new.certificate, (stranger.certificate,), new.key_pem)

    with pytest.raises(PermanentDeployError, match="does not link by signature"):
        AcmDeployer(account, "shop-acm", {"certificate_arn": arn}).deploy(unlinked)

    assert _held(moto, arn) == old.fingerprint


def test_without_an_arn_a_new_certificate_is_imported_found_again_and_deleted_by_rollback(
        moto: MotoServer, account: AwsAccount, leaves: Leaves) -> None:
    first, second = leaves.bundle("api", "api.example.test"), leaves.bundle("api", "api.example.test")
    receipt = AcmDeployer(account, "api-acm", {"region": REGION}).deploy(first)
    arn = receipt.undo["certificate_arn"]
    assert receipt.undo["created"] and receipt.previous_fingerprint is None and _arns(moto) == [arn]

    again = AcmDeployer(account, "api-acm", {"region": REGION}, lookup=leaves.lookup)  # a later run: finds it by tag
    assert again.current() == first.fingerprint
    second_receipt = again.deploy(second)
    assert second_receipt.undo["certificate_arn"] == arn and _arns(moto) == [arn]
    assert _held(moto, arn) == second.fingerprint
    again.rollback(second_receipt)
    assert _held(moto, arn) == first.fingerprint

    again.rollback(receipt)

    assert _arns(moto) == []
    assert again.current() is None
    with pytest.raises(VerificationError):
        again.verify(first.fingerprint)


def test_remove_deletes_restore_imports_it_again_from_the_keystore(
        moto: MotoServer, account: AwsAccount, leaves: Leaves) -> None:
    bundle = leaves.bundle("api", "api.example.test")
    AcmDeployer(account, "api-acm", {"region": REGION}).deploy(bundle)
    target = AcmDeployer(account, "api-acm", {"region": REGION}, lookup=leaves.lookup)
    removal = target.remove()
    assert removal.fingerprint == bundle.fingerprint and _arns(moto) == []
    detail = target.restore(removal)
    [arn] = _arns(moto)
    assert arn in detail and _held(moto, arn) == bundle.fingerprint
    assert AcmDeployer(account, "api-acm", {"region": REGION}).current() == bundle.fingerprint  # found by its tag
    with pytest.raises(PermanentDeployError, match="not in certpilot's keystore"):
        AcmDeployer(account, "api-acm", {"region": REGION}).restore(target.remove())  # no lookup: no key
    assert _arns(moto) == []


def test_removing_a_certificate_a_listener_uses_is_refused(moto: MotoServer, account: AwsAccount, leaves: Leaves,
                                                           existing: tuple[str, DeployBundle]) -> None:
    arn, _ = existing
    spare = moto.client("acm", REGION).import_certificate(
        **leaves.import_kwargs(leaves.bundle("spare", "spare.example.test")))["CertificateArn"]
    listener = make_listener(moto, make_load_balancer(moto, REGION, "shop"), 443, arn)
    deployer = AcmDeployer(account, "shop-acm", {"certificate_arn": arn})

    with pytest.raises(PermanentDeployError, match="still used by") as refused:
        deployer.remove()  # moto itself would delete it

    assert listener in str(refused.value)
    assert arn in _arns(moto)
    moto.client("elbv2", REGION).modify_listener(ListenerArn=listener, Certificates=[{"CertificateArn": spare}])
    deployer.remove()
    assert _arns(moto) == [spare]


def test_no_key_in_receipts_or_errors(moto: MotoServer, account: AwsAccount, leaves: Leaves,
                                      existing: tuple[str, DeployBundle]) -> None:
    arn, _ = existing
    new = leaves.bundle("shop", "shop.example.test")
    deployer = AcmDeployer(account, "shop-acm", {"certificate_arn": arn})
    texts = [json.dumps(deployer.deploy(new).as_dict()), repr(deployer), repr(new)]
    for bad_key in (b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", leaves.bundles[
            next(iter(leaves.bundles))].key_pem()):
        with pytest.raises((PermanentDeployError, KeyMismatchError)) as refused:
            deployer.deploy(DeployBundle(new.name, leaves.bundle("x", "x.test").certificate, new.chain,
                                         lambda k=bad_key: k))
        texts.append(str(refused.value))
    with pytest.raises(PermanentDeployError) as refused:
        deployer.rollback(deployer.deploy(leaves.bundle("shop", "shop.example.test")))
    texts.append(str(refused.value))
    assert leaks("\n".join(texts).encode(), leaves.keys) == []
    assert "PRIVATE KEY" not in "\n".join(texts)


def test_an_amazon_issued_certificate_is_not_overwritten(moto: MotoServer, account: AwsAccount, leaves: Leaves) -> None:
    arn = moto.client("acm", REGION).request_certificate(DomainName="shop.example.test")["CertificateArn"]
    held = _held(moto, arn)

    with pytest.raises(PermanentDeployError, match="AMAZON_ISSUED certificate cannot be re-imported"):
        AcmDeployer(account, "shop-acm", {"certificate_arn": arn}).deploy(leaves.bundle("shop", "shop.example.test"))

    assert _held(moto, arn) == held
