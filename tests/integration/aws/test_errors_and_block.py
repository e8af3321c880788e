"""Errors at the edge (transient versus permanent, named by cause, carrying service, operation, code,
region and ARN, quickly) and the AWS account block building working connectors against the moto server."""

from __future__ import annotations

import pickle
import time
import uuid

import pytest
from pydantic import SecretStr

from blocks.aws import AwsAccountBlock
from blocks.targets import build_deployer
from certpilot.deployment import Deployer, DeployError, PermanentDeployError
from certpilot.discovery import Source, split
from certpilot.errors import ServiceError, ServiceRefusedError, ServiceUnavailableError
from certpilot.target_kinds import UnknownTargetKindError
from connectors.aws import AwsAccount, AwsNotFoundError, AwsRefusedError, AwsUnavailableError
from connectors.aws_deploy import AcmDeployer, ElbListenerDeployer
from lab.moto import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoServer, free_port
from tests.integration.aws.conftest import REGIONS, Leaves
from tests.keyprobe import leaks

LISTENER = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:listener/app/web/50dc6c495c0c9188/f2f7dc8efc522ab2"


def test_a_closed_port_is_a_transient_error_within_the_timeouts(leaves: Leaves) -> None:
    account = AwsAccount(regions=REGIONS, access_key_id="x", secret_access_key="y",
                         endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=1, read_timeout=2,
                         max_attempts=2)
    bundle = leaves.bundle("shop", "shop.example.test")
    for deployer, operation in ((AcmDeployer(account, "shop-acm", {"region": REGIONS[0]}), "list_certificates"),
                                (ElbListenerDeployer(account, "web-lb", {"listener_arn": LISTENER}),
                                 "describe_listeners")):
        started = time.monotonic()
        with pytest.raises(DeployError) as failed:
            deployer.deploy(bundle)
        assert time.monotonic() - started < 5
        assert f"{operation} in {REGIONS[0]}" in str(failed.value)
        assert "EndpointConnectionError" in str(failed.value)
        _carries(failed.value, AwsUnavailableError, ServiceUnavailableError, operation=operation,
                 code="EndpointConnectionError", region=REGIONS[0])


def _carries(error: BaseException, cls: type[ServiceError], cause: type[ServiceError], **fields: object) -> None:
    """Named by its cause, with its data as attributes, the same after pickling (Prefect persists it)."""
    assert isinstance(error, cls) and isinstance(error, cause)
    assert {k: getattr(error, k) for k in fields} == fields
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)


def test_server_errors_are_transient_and_missing_resources_permanent(moto: MotoServer, account: AwsAccount,
                                                                     leaves: Leaves) -> None:
    # moto answers 500 in a region it does not know: a 5xx is worth retrying.
    broken = AwsAccount(regions=("xx-nowhere-1",), access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY,
                        endpoint_url=moto.url, max_attempts=1)
    with pytest.raises(DeployError, match="acm list_certificates in xx-nowhere-1") as failing:
        AcmDeployer(broken, "t", {"region": "xx-nowhere-1"}).current()
    _carries(failing.value, AwsUnavailableError, ServiceUnavailableError, service="acm",
             operation="list_certificates", region="xx-nowhere-1")

    missing = f"arn:aws:acm:{REGIONS[0]}:123456789012:certificate/00000000-0000-0000-0000-000000000000"
    with pytest.raises(PermanentDeployError, match="does not exist") as gone:
        AcmDeployer(account, "t", {"certificate_arn": missing}).deploy(leaves.bundle("a", "a.example.test"))
    assert missing in str(gone.value) and not isinstance(gone.value, DeployError)
    with pytest.raises(PermanentDeployError,
                       match=f"describe_listeners in {REGIONS[0]} on {LISTENER}: ListenerNotFound") as unknown:
        ElbListenerDeployer(account, "t", {"listener_arn": LISTENER}).current()
    _carries(unknown.value, AwsNotFoundError, ServiceRefusedError, service="elbv2", operation="describe_listeners",
             code="ListenerNotFound", region=REGIONS[0], arn=LISTENER)


def test_the_block_builds_a_source_and_each_kind_of_deployer(moto: MotoServer, leaves: Leaves) -> None:
    secret = "secret-0123456789"  # moto takes any secret
    block = AwsAccountBlock(account_alias="lab", regions=list(REGIONS), access_key_id=ACCESS_KEY_ID,
                            secret_access_key=SecretStr(secret), session_token=SecretStr("token-xyz"),
                            endpoint_url=moto.url, connect_timeout_seconds=2, max_attempts=2)
    assert secret not in repr(block) and "token-xyz" not in repr(block)
    assert secret not in repr(block.account()) and "token-xyz" not in repr(block.account())
    schema = AwsAccountBlock._to_block_schema(block_type_id=uuid.uuid4())  # what `prefect block register` sends
    assert set(schema.fields["secret_fields"]) == {"secret_access_key", "session_token"}
    bundle = leaves.bundle("shop", "shop.example.test")

    acm = build_deployer(block, "shop-acm", "aws-acm", {"region": REGIONS[1]}, leaves.lookup)
    assert isinstance(acm, Deployer) and acm.kind == "aws-acm"
    receipt = acm.deploy(bundle)
    source = block.source()
    assert isinstance(source, Source) and source.name == "aws:lab"
    found, problems = split(source.discover())
    assert problems == []
    assert [f.locator for f in found] == [f"aws-acm://{REGIONS[1]}/{receipt.undo['certificate_arn']}"]

    for kind in ("aws-elbv2", "aws-iam-elbv2"):
        deployer = build_deployer(block, "web-lb", kind, {"listener_arn": LISTENER, "role": "sni"})
        assert isinstance(deployer, Deployer) and deployer.kind == kind
    with pytest.raises(PermanentDeployError, match="an AWS account deploys kinds aws-acm, aws-elbv2, aws-iam-elbv2, "
                                                   "not 'ssh-nginx'"):
        build_deployer(block, "x", "ssh-nginx", {})
    with pytest.raises(UnknownTargetKindError, match="unknown target kind 'aws-s3'"):
        build_deployer(block, "x", "aws-s3", {})


def test_request_values_never_reach_an_error_message(account: AwsAccount, leaves: Leaves) -> None:
    """botocore quotes the offending value when a parameter has the wrong type: certpilot cuts it out."""
    bundle = leaves.bundle("shop", "shop.example.test")
    with pytest.raises(PermanentDeployError, match="Invalid type for parameter PrivateKey") as refused:
        account.call("iam", REGIONS[0], "upload_server_certificate", ServerCertificateName="shop",
                     CertificateBody=bundle.certificate_pem().decode(), PrivateKey=bundle.key_pem())  # bytes, not str
    assert leaks(str(refused.value).encode(), leaves.keys) == []
    assert "BEGIN" not in str(refused.value)
    _carries(refused.value, AwsRefusedError, ServiceRefusedError, service="iam", operation="upload_server_certificate",
             code="ParamValidationError")
