"""The risk and crypto inventory artifacts: ``publish_risk`` scores every certificate in service
(certpilot.risk) and counts their keys and signatures (certpilot.crypto_inventory), under the policy in
force (blocks.policy.policy_in_force), and publishes two markdown artifacts, ``risk`` and
``crypto-inventory``. Everything shown is public and escaped by the core's markdown builders."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact

from blocks.policy import policy_in_force
from certpilot.clock import utcnow
from certpilot.crypto_inventory import crypto_inventory, crypto_markdown
from certpilot.database import get_engine, read_session
from certpilot.risk import risk_markdown, risk_report

__all__ = ["DEFAULT_LISTED", "PublishedRisk", "publish_risk"]

DEFAULT_LISTED = 50


@dataclass(frozen=True)
class PublishedRisk:
    """What the artifacts showed, in numbers: certificates scored, per score band, the riskiest (fingerprint,
    score); certificates in service, the weak ones, and those a post-quantum move would reissue."""

    scored: int
    distribution: dict[str, int]
    riskiest: tuple[tuple[str, int], ...]
    certificates: int
    weak: int
    to_reissue: int


@task(name="publish-risk", task_run_name="publish-risk", timeout_seconds=600)
def publish_risk(limit: int = DEFAULT_LISTED) -> PublishedRisk:
    """Publish the ``risk`` artifact (the ``limit`` riskiest certificates and why) and the
    ``crypto-inventory`` artifact (keys, signatures, weak ones, post-quantum readiness)."""
    policy = policy_in_force()
    now = utcnow()
    with read_session(get_engine()) as session:
        risk = risk_report(session, policy, now, limit)
        crypto = crypto_inventory(session, now)
    create_markdown_artifact(key="risk", markdown=risk_markdown(risk),
                             description="The riskiest certificates, with the reasons for each score")
    create_markdown_artifact(key="crypto-inventory", markdown=crypto_markdown(crypto),
                             description="Keys and signatures in use, the weak ones, post-quantum readiness")
    return PublishedRisk(risk.scored, dict(risk.distribution),
                         tuple((r.fingerprint_sha256, r.score) for r in risk.risks[:10]),
                         len(crypto.certificates), len(crypto.weak), crypto.pq.classical)
