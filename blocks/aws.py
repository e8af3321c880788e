"""The AWS account block: credentials and regions of one account, as operators configure it in the
Prefect UI, with the two factories every connector block has: ``source()`` (ACM, ELBv2 listeners and
IAM server certificates, connectors/aws_source.py) and ``deployer(name, kind, settings, lookup)`` for
the target kinds aws-acm, aws-elbv2 and aws-iam-elbv2 (their settings: certpilot/target_kinds.py).

Block secrets are encrypted in the Prefect database with a key kept in the same database unless the
server sets PREFECT_SERVER_ENCRYPTION_KEY, and any API client may read them with include_secrets:
protect the Prefect API accordingly, and prefer a narrowly scoped IAM user (acm:ImportCertificate,
acm:Get*/Describe*/List*/DeleteCertificate/AddTagsToCertificate, elasticloadbalancing:Describe*/
ModifyListener/AddListenerCertificates/RemoveListenerCertificates, iam:*ServerCertificate*).
"""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr

from certpilot.discovery import Source

DOCS = "https://github.com/certpilot/certpilot/blob/main/README.md#aws"


class AwsAccountBlock(Block):
    """One AWS account: where its certificates are found (ACM, load balancer listeners, IAM) and deployed."""

    _block_type_name: ClassVar[str] = "AWS account"
    _block_type_slug: ClassVar[str] = "aws-account"
    _description: ClassVar[str] = ("An AWS account's credentials and regions: discovers ACM, ELBv2 listener and IAM "
                                   "server certificates, and deploys to ACM and load balancer listeners.")
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.targets import build_deployer
from blocks.aws import AwsAccountBlock

aws = AwsAccountBlock.load("BLOCK_NAME")
source = aws.source()
deployer = build_deployer(aws, "web-alb", "aws-elbv2", {"listener_arn": "arn:aws:elasticloadbalancing:...", "role": "default"})
```
"""

    account_alias: str = Field(description="A short name for the account; discovery records its source as aws:<alias>.")
    regions: list[str] = Field(min_length=1, description="Regions to discover in; IAM (global) is read through "
                                                         "the first.")
    access_key_id: str | None = Field(default=None, description="Access key id (empty: boto3's default credential "
                                                                "chain).")
    secret_access_key: SecretStr | None = Field(default=None, description="Secret access key.")
    session_token: SecretStr | None = Field(default=None, description="Session token of temporary credentials, if any.")
    endpoint_url: str | None = Field(default=None, description="Another API endpoint for every service: a VPC "
                                                               "endpoint, or moto in tests and demos.")
    discover_acm: bool = Field(default=True, description="Discover ACM certificates.")
    discover_elbv2: bool = Field(default=True, description="Discover load balancer listeners' certificates.")
    discover_iam: bool = Field(default=True, description="Discover IAM server certificates.")
    connect_timeout_seconds: float = Field(default=5.0, gt=0, description="Connect timeout of every API call.")
    read_timeout_seconds: float = Field(default=30.0, gt=0, description="Read timeout of every API call.")
    max_attempts: int = Field(default=3, ge=1, le=10, description="Attempts per API call, retries included "
                                                                  "(botocore's standard retry mode).")

    def account(self) -> Any:
        """The connector's account object (credentials revealed only here)."""
        from connectors.aws import AwsAccount

        return AwsAccount(
            regions=tuple(self.regions), access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            session_token=self.session_token.get_secret_value() if self.session_token else None,
            endpoint_url=self.endpoint_url, connect_timeout=self.connect_timeout_seconds,
            read_timeout=self.read_timeout_seconds, max_attempts=self.max_attempts)

    def source(self) -> Source:
        from connectors.aws_source import AwsSource

        return AwsSource(self.account(), self.account_alias, acm=self.discover_acm, elbv2=self.discover_elbv2,
                         iam=self.discover_iam)
