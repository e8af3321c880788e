"""Deployers (certpilot.deployment.Deployer) for AWS: an ACM certificate, and an ELBv2 listener's
certificate stored in ACM or in IAM.

Kinds and their settings (typed models in certpilot.target_kinds; a dict is validated through them):

``aws-acm`` (AcmSettings): re-import into one ACM certificate ARN (``certificate_arn``), or, without
    one, import a new certificate tagged ``certpilot:target=<target name>`` that later calls find by
    that tag (the receipt's undo holds the ARN).

``aws-elbv2`` (ListenerSettings): import a new ACM certificate and put it on a load balancer listener,
    as its default certificate or as an SNI certificate (``role``).

``aws-iam-elbv2`` (ListenerSettings): the same listener swap, with the certificate uploaded as an IAM
    server certificate named ``<managed certificate name>-<first 16 hex of the fingerprint>`` under the
    path ``/certpilot/<target name>/``.

What certpilot checks itself because moto does not (and so that AWS refusals are not the only guard):
the private key matches the certificate (when the DeployBundle is built: a mismatched pair never gets
here) and the chain links by signature, before any call that changes state; a certificate is deleted
only when no listener holds it (scanned, not trusted to the store); the chain read back is kept only
where it links (moto appends a fake root); expiry is read from the certificate (moto invents IAM's).

Rollback: ``aws-acm`` re-imports the previous certificate with its key, which certpilot can only get
from its own keystore through the BundleLookup (ACM never exports an imported key): without it,
rollback raises PermanentDeployError. A certificate certpilot imported as new is deleted instead.
The listener kinds swap the previous certificate(s) back and delete what they stored once nothing
uses it.

Retiring: ``aws-acm``'s ``remove`` deletes the ACM certificate (refused while a listener uses it); ACM
cannot undelete, so ``restore`` imports it again from certpilot's inventory and keystore (through the
BundleLookup), tagged with the target, under a new ARN (a target configured with a certificate_arn must
be pointed at it: the restore says so); ``purge`` has nothing left to delete. The listener kinds'
``remove`` takes certpilot's SNI entries off the listener and keeps the certificates it stored for the
target until ``purge`` deletes them (a certificate still on any listener is refused); ``restore`` puts
the entries back. A listener's default certificate is never removed: a listener needs one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, cast

from cryptography import x509

from certpilot.deployment import (
    BundleLookup,
    DeployBundle,
    PermanentDeployError,
    Receipt,
    Removal,
    Verification,
    VerificationError,
)
from certpilot.errors import CertpilotError
from certpilot.target_kinds import AcmSettings, ListenerSettings, TargetKind, validate_settings
from connectors.aws import AwsAccount, Listener, chain_links, is_acm_arn, is_iam_arn
from connectors.aws_source import ACM_KEY_TYPES, ACM_STATUSES

__all__ = ["TARGET_TAG", "AcmDeployer", "ElbListenerDeployer", "IamListenerDeployer"]

logger = logging.getLogger(__name__)

TARGET_TAG = "certpilot:target"  # on ACM certificates certpilot imported: the target's name
CERTIFICATE_TAG = "certpilot:certificate"  # the managed certificate's name
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+@-]")


def _safe_name(text: str, limit: int) -> str:
    return _UNSAFE.sub("_", text)[:limit] or "_"


def _check_chain(bundle: DeployBundle, where: str) -> None:
    if not chain_links(bundle.certificate, bundle.chain):
        raise PermanentDeployError(f"{where}: the chain given with {bundle.fingerprint[:16]} does not link by "
                                   "signature (each certificate must sign the one before it): nothing was changed")


def _pem_kwargs(bundle: DeployBundle, key_pem: bytes) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"Certificate": bundle.certificate_pem(), "PrivateKey": key_pem}
    if bundle.chain:
        kwargs["CertificateChain"] = bundle.chain_pem()
    return kwargs


def _dns_names(certificate: x509.Certificate) -> frozenset[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName))


class AcmDeployer:
    """One ACM certificate ARN, re-imported in place (see the module docstring for settings)."""

    kind = TargetKind.AWS_ACM

    def __init__(self, account: AwsAccount, name: str, settings: AcmSettings | Mapping[str, Any],
                 lookup: BundleLookup | None = None) -> None:
        self.settings = cast(AcmSettings, validate_settings(self.kind, settings, name))
        self.account, self.name, self.lookup = account, name, lookup
        self.certificate_arn: str | None = self.settings.certificate_arn
        self.region: str = self.settings.acm_region
        self._given_arn = self.certificate_arn is not None

    @property
    def _where(self) -> str:
        return f"{self.name} (aws-acm {self.certificate_arn or 'new certificate'} in {self.region})"

    def _arn(self) -> str | None:
        """The ARN this target fills: the configured one, or the one certpilot imported and tagged."""
        if self.certificate_arn is None:
            for summary in self.account.pages("acm", self.region, "list_certificates", "CertificateSummaryList",
                                              CertificateStatuses=list(ACM_STATUSES),
                                              Includes={"keyTypes": list(ACM_KEY_TYPES)}):
                arn = summary["CertificateArn"]
                if self.account.acm_tags(arn).get(TARGET_TAG) == _safe_name(self.name, 256):
                    self.certificate_arn = arn
                    break
        return self.certificate_arn

    def _import(self, bundle: DeployBundle, arn: str | None) -> str:
        _check_chain(bundle, self._where)
        key_pem = bundle.key_pem()
        kwargs = _pem_kwargs(bundle, key_pem)
        del key_pem
        if arn:
            self.account.call("acm", self.region, "import_certificate", arn=arn, CertificateArn=arn, **kwargs)
            return arn
        tags = [{"Key": TARGET_TAG, "Value": _safe_name(self.name, 256)},
                {"Key": CERTIFICATE_TAG, "Value": _safe_name(bundle.name, 256)}]
        return str(self.account.call("acm", self.region, "import_certificate", Tags=tags, **kwargs)["CertificateArn"])

    def deploy(self, bundle: DeployBundle) -> Receipt:
        _check_chain(bundle, self._where)
        arn = self._arn()
        previous = self.account.stored_certificate(arn) if arn else None
        if arn and previous is None and self._given_arn:
            raise PermanentDeployError(f"{self._where}: the certificate ARN does not exist")
        if arn and previous is not None:
            kind = self.account.call("acm", self.region, "describe_certificate", arn=arn,
                                     CertificateArn=arn)["Certificate"].get("Type")
            if kind != "IMPORTED":
                raise PermanentDeployError(f"{self._where}: an {kind} certificate cannot be re-imported (ACM renews "
                                           "its own); give an IMPORTED certificate's ARN, or none to import a new one")
        previous_fp = previous.fingerprint if previous else None
        if previous_fp == bundle.fingerprint:
            return Receipt(self.name, self.kind, bundle.fingerprint, previous_fp,
                           {"certificate_arn": arn, "region": self.region, "unchanged": True})
        created = previous is None
        arn = self._import(bundle, None if created else arn)
        self.certificate_arn = arn
        return Receipt(self.name, self.kind, bundle.fingerprint, previous_fp,
                       {"certificate_arn": arn, "region": self.region, "created": created,
                        "previous_fingerprint": previous_fp})

    def rollback(self, receipt: Receipt) -> None:
        undo = receipt.undo
        arn = undo.get("certificate_arn") or self._arn()
        if undo.get("unchanged") or not arn:
            return
        if undo.get("created"):
            self.account.delete_certificate(arn)  # refuses while a listener uses it
            if self.certificate_arn == arn:
                self.certificate_arn = None
            return
        previous_fp = undo.get("previous_fingerprint") or receipt.previous_fingerprint
        if not previous_fp:
            raise PermanentDeployError(f"{self._where}: the receipt records no previous certificate to restore")
        if self.account.fingerprint_at(arn) == previous_fp:
            return
        previous = self.lookup(previous_fp) if self.lookup else None
        if previous is None:
            raise PermanentDeployError(
                f"{self._where}: cannot roll back to {previous_fp[:16]}: its private key is not in certpilot's "
                "keystore, and ACM does not export imported keys, so the previous certificate cannot be re-imported")
        if previous.fingerprint != previous_fp:
            raise PermanentDeployError(f"{self._where}: the lookup for {previous_fp[:16]} returned "
                                       f"{previous.fingerprint[:16]}")
        self._import(previous, arn)

    def verify(self, expected: str) -> Verification:
        arn = self._arn()
        served = self.account.fingerprint_at(arn) if arn else None
        if served != expected:
            reason = "no certificate" if arn is None else f"ACM {arn} holds another certificate" if served else \
                f"ACM {arn} does not exist"
            raise VerificationError(self.name, expected, served, reason)
        return Verification(self.name, expected, "api", f"acm get_certificate {arn} in {self.region}")

    def remove(self) -> Removal:
        """Delete the ACM certificate (refused while anything uses it); ``restore`` imports it again."""
        arn = self._arn()
        held = self.account.fingerprint_at(arn) if arn else None
        if arn is None or held is None:
            return Removal(self.name, self.kind, None, {"certificate_arn": arn, "region": self.region}, None,
                           f"{arn or 'no certificate'} in {self.region}: nothing to delete")
        self.account.delete_certificate(arn)  # refuses while a listener uses it
        self.certificate_arn = None if not self._given_arn else self.certificate_arn
        logger.info("%s: deleted %s", self._where, arn)
        return Removal(self.name, self.kind, held, {"certificate_arn": arn, "region": self.region}, None,
                       f"deleted {arn} from ACM, which cannot undelete: a restore imports it again from certpilot's "
                       "keystore, under a new ARN")

    def restore(self, removal: Removal) -> str:
        """Import the removed certificate again (with its key, from certpilot's keystore), tagged with the target."""
        fp = removal.fingerprint
        if fp is None:
            return "nothing was removed"
        arn = self._arn()
        if arn and self.account.fingerprint_at(arn) == fp:
            return f"{arn} holds it already"
        bundle = self.lookup(fp) if self.lookup else None
        if bundle is None or bundle.fingerprint != fp:
            raise PermanentDeployError(f"{self._where}: cannot restore {fp[:16]}: its private key is not in "
                                       "certpilot's keystore, and ACM cannot undelete")
        new_arn = self._import(bundle, None)
        old_arn = removal.undo.get("certificate_arn")
        if not self._given_arn:
            self.certificate_arn = new_arn
            return f"imported again as {new_arn}"
        return (f"imported again as {new_arn}; ACM cannot undelete {old_arn}: set the target's certificate_arn to "
                "the new ARN")

    def purge(self, removal: Removal) -> None:
        """Nothing to do: remove deleted the ACM certificate already; certpilot's inventory keeps the record."""

    def current(self) -> str | None:
        arn = self._arn()
        return self.account.fingerprint_at(arn) if arn else None


class _ListenerDeployer:
    """A listener's default or SNI certificate; subclasses store the certificate in ACM or IAM."""

    kind: TargetKind

    def __init__(self, account: AwsAccount, name: str, settings: ListenerSettings | Mapping[str, Any],
                 lookup: BundleLookup | None = None) -> None:
        self.settings = cast(ListenerSettings, validate_settings(self.kind, settings, name))
        self.account, self.name, self.lookup = account, name, lookup
        self.listener_arn = self.settings.listener_arn
        self.region = self.settings.listener_region
        self.role = self.settings.role

    @property
    def _where(self) -> str:
        return f"{self.name} ({self.kind} {self.role} certificate of {self.listener_arn})"

    # Where the certificate is stored: ACM or IAM

    def _store(self, bundle: DeployBundle) -> str:
        raise NotImplementedError

    def _is_mine(self, arn: str) -> bool:
        raise NotImplementedError

    def _stored_by_me(self) -> list[str]:
        raise NotImplementedError

    # The listener

    def _managed_sni(self, listener: Listener) -> list[str]:
        return [arn for arn in listener.sni if self._is_mine(arn)]

    def _set_default(self, certificate_arn: str) -> None:
        before = self.account.listener(self.listener_arn)
        self.account.call("elbv2", self.region, "modify_listener", arn=self.listener_arn,
                          ListenerArn=self.listener_arn, Certificates=[{"CertificateArn": certificate_arn}])
        # AWS keeps the SNI list on modify_listener; moto drops it. Put back whatever went missing.
        after = self.account.listener(self.listener_arn)
        missing = [a for a in before.sni if a not in after.sni and a != certificate_arn]
        if missing:
            self._add_sni(missing)

    def _add_sni(self, arns: list[str]) -> None:
        self.account.call("elbv2", self.region, "add_listener_certificates", arn=self.listener_arn,
                          ListenerArn=self.listener_arn, Certificates=[{"CertificateArn": a} for a in arns])

    def _remove_sni(self, arns: list[str]) -> None:
        self.account.call("elbv2", self.region, "remove_listener_certificates", arn=self.listener_arn,
                          ListenerArn=self.listener_arn, Certificates=[{"CertificateArn": a} for a in arns])

    def _delete_if_unused(self, arn: str) -> None:
        try:
            self.account.delete_certificate(arn)
        except PermanentDeployError as exc:
            logger.warning("%s: left %s in place: %s", self.name, arn, exc)

    def deploy(self, bundle: DeployBundle) -> Receipt:
        _check_chain(bundle, self._where)
        listener = self.account.listener(self.listener_arn)
        if self.role == "default":
            previous = [listener.default] if listener.default else []
        else:
            names = _dns_names(bundle.certificate)
            previous = []
            for arn in listener.sni:
                stored = self.account.stored_certificate(arn)
                if stored and stored.fingerprint == bundle.fingerprint:
                    return Receipt(self.name, self.kind, bundle.fingerprint, bundle.fingerprint,
                                   {"listener_arn": self.listener_arn, "role": self.role, "unchanged": True})
                if self._is_mine(arn) or (stored and names and _dns_names(stored.certificate) == names):
                    previous.append(arn)
        previous_fp = self.account.fingerprint_at(previous[0]) if previous else None
        if self.role == "default" and previous_fp == bundle.fingerprint:
            return Receipt(self.name, self.kind, bundle.fingerprint, previous_fp,
                           {"listener_arn": self.listener_arn, "role": self.role, "unchanged": True})
        stored_arn = self._store(bundle)
        try:
            if self.role == "default":
                self._set_default(stored_arn)
            else:
                self._add_sni([stored_arn])
                if previous:
                    self._remove_sni(previous)
        except CertpilotError:
            try:
                self._undo(previous, stored_arn)
            except CertpilotError as undo_error:
                logger.warning("%s: could not undo a half-done swap: %s", self.name, undo_error)
            raise
        return Receipt(self.name, self.kind, bundle.fingerprint, previous_fp,
                       {"listener_arn": self.listener_arn, "role": self.role, "previous": previous,
                        "stored": stored_arn})

    def _undo(self, previous: list[str], stored_arn: str) -> None:
        """Put ``previous`` back in place of ``stored_arn`` and delete ``stored_arn`` once nothing holds it."""
        listener = self.account.listener(self.listener_arn)
        if self.role == "default":
            if previous and listener.default != previous[0]:
                self._set_default(previous[0])
        else:
            missing = [a for a in previous if a not in listener.sni]
            if missing:
                self._add_sni(missing)
            if stored_arn in listener.sni:
                self._remove_sni([stored_arn])
        self._delete_if_unused(stored_arn)

    def rollback(self, receipt: Receipt) -> None:
        undo = receipt.undo
        if undo.get("unchanged"):
            return
        if undo.get("listener_arn") != self.listener_arn:
            raise PermanentDeployError(f"{self._where}: the receipt is for {undo.get('listener_arn')}")
        self._undo(list(undo.get("previous") or []), str(undo["stored"]))

    def verify(self, expected: str) -> Verification:
        listener = self.account.listener(self.listener_arn)
        if self.role == "default":
            served = self.account.fingerprint_at(listener.default) if listener.default else None
            if served != expected:
                raise VerificationError(self.name, expected, served,
                                        f"listener {self.listener_arn} default certificate is {listener.default}")
            return Verification(self.name, expected, "api",
                                f"elbv2 listener {self.listener_arn} default certificate {listener.default}")
        fingerprints = {arn: self.account.fingerprint_at(arn) for arn in listener.sni}
        for arn, served in fingerprints.items():
            if served == expected:
                return Verification(self.name, expected, "api",
                                    f"elbv2 listener {self.listener_arn} SNI certificate {arn}")
        mine = [fingerprints[a] for a in self._managed_sni(listener)]
        raise VerificationError(self.name, expected, mine[0] if mine else None,
                                f"listener {self.listener_arn} has no SNI certificate with that fingerprint "
                                f"({len(fingerprints)} SNI certificates)")

    def remove(self) -> Removal:
        """Take certpilot's SNI entries off the listener; what it stored is kept until ``purge``."""
        if self.role == "default":
            raise PermanentDeployError(f"{self._where}: a listener needs a default certificate, so certpilot does "
                                       "not take it off: deploy another certificate there, or remove the listener")
        mine = self._managed_sni(self.account.listener(self.listener_arn))
        held = self.account.fingerprint_at(mine[0]) if mine else None
        if mine:
            self._remove_sni(mine)
        kept = self._stored_by_me()
        logger.info("%s: took %s off the listener", self._where, ", ".join(mine) or "nothing")
        return Removal(self.name, self.kind, held, {"listener_arn": self.listener_arn, "taken_off": mine,
                                                    "kept": kept}, None,
                       f"taken off listener {self.listener_arn}; the {len(kept)} certificate(s) stored for the target "
                       "are kept until the retirement is confirmed")

    def restore(self, removal: Removal) -> str:
        """Put the SNI entries ``remove`` took off back on the listener."""
        if removal.undo.get("listener_arn") != self.listener_arn:
            raise PermanentDeployError(f"{self._where}: the removal is for {removal.undo.get('listener_arn')}")
        arns = [str(a) for a in removal.undo.get("taken_off") or []]
        if not arns and removal.fingerprint:
            arns = [a for a in self._stored_by_me() if self.account.fingerprint_at(a) == removal.fingerprint][:1]
        missing = [a for a in arns if a not in self.account.listener(self.listener_arn).sni]
        if arns and not missing:
            return "the listener holds it already"
        if missing:
            self._add_sni(missing)
        return f"put {', '.join(missing) or 'nothing'} back on listener {self.listener_arn}"

    def purge(self, removal: Removal) -> None:
        """Delete the certificates stored for the target (refused while any listener holds one)."""
        for arn in self._stored_by_me():
            self.account.delete_certificate(arn)

    def current(self) -> str | None:
        listener = self.account.listener(self.listener_arn)
        if self.role == "default":
            return self.account.fingerprint_at(listener.default) if listener.default else None
        mine = self._managed_sni(listener)
        return self.account.fingerprint_at(mine[0]) if mine else None


class ElbListenerDeployer(_ListenerDeployer):
    """A listener's certificate, imported into ACM in the listener's region and tagged with the target."""

    kind = TargetKind.AWS_ELBV2

    def _store(self, bundle: DeployBundle) -> str:
        key_pem = bundle.key_pem()
        kwargs = _pem_kwargs(bundle, key_pem)
        del key_pem
        tags = [{"Key": TARGET_TAG, "Value": _safe_name(self.name, 256)},
                {"Key": CERTIFICATE_TAG, "Value": _safe_name(bundle.name, 256)}]
        return str(self.account.call("acm", self.region, "import_certificate", Tags=tags, **kwargs)["CertificateArn"])

    def _is_mine(self, arn: str) -> bool:
        return is_acm_arn(arn) and self.account.acm_tags(arn).get(TARGET_TAG) == _safe_name(self.name, 256)

    def _stored_by_me(self) -> list[str]:
        return [s["CertificateArn"] for s in self.account.pages(
                    "acm", self.region, "list_certificates", "CertificateSummaryList",
                    CertificateStatuses=list(ACM_STATUSES), Includes={"keyTypes": list(ACM_KEY_TYPES)})
                if self._is_mine(s["CertificateArn"])]


class IamListenerDeployer(_ListenerDeployer):
    """A listener's certificate, uploaded as an IAM server certificate under ``/certpilot/<target>/``."""

    kind = TargetKind.AWS_IAM_ELBV2

    @property
    def _path(self) -> str:
        return f"/certpilot/{_safe_name(self.name, 100)}/"

    def _store(self, bundle: DeployBundle) -> str:
        name = f"{_safe_name(bundle.name, 100)}-{bundle.fingerprint[:16]}"
        region = self.account.global_region
        for meta in self.account.pages("iam", region, "list_server_certificates", "ServerCertificateMetadataList",
                                       PathPrefix=self._path):
            if meta["ServerCertificateName"] == name and self.account.fingerprint_at(meta["Arn"]) == bundle.fingerprint:
                return str(meta["Arn"])  # uploaded by an earlier attempt
        key_pem = bundle.key_pem()
        kwargs: dict[str, Any] = {"CertificateBody": bundle.certificate_pem().decode(), "PrivateKey": key_pem.decode()}
        del key_pem
        if bundle.chain:
            kwargs["CertificateChain"] = bundle.chain_pem().decode()
        answer = self.account.call("iam", region, "upload_server_certificate", Path=self._path,
                                   ServerCertificateName=name, **kwargs)
        return str(answer["ServerCertificateMetadata"]["Arn"])

    def _is_mine(self, arn: str) -> bool:
        return is_iam_arn(arn) and f":server-certificate{self._path}" in arn

    def _stored_by_me(self) -> list[str]:
        return [str(m["Arn"]) for m in self.account.pages("iam", self.account.global_region,
                                                          "list_server_certificates",
                                                          "ServerCertificateMetadataList", PathPrefix=self._path)
                if self._is_mine(str(m["Arn"]))]
