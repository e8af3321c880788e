"""Target kinds and their settings: what each kind of deployment target is configured with.

``TargetKind`` names every kind certpilot deploys to; each has one pydantic settings model here (its
keys, their types and defaults, and the rules between them). A Target row stores its settings as a
dict; ``validate_settings`` turns that dict into the kind's model or raises TargetSettingsError naming
what is wrong and the valid keys. Deployers (connectors/) take the typed model; the registry that maps a
kind to its connection block and deployer lives in blocks/targets.py.

Models are frozen and refuse unknown keys. They never echo a value in an error: ``verify_trust`` is PEM.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Literal

from cryptography import x509
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from certpilot.errors import ParseError, PermanentDeployError
from certpilot.formats import load_bundle

__all__ = [
    "SETTINGS",
    "AcmSettings",
    "HaproxySettings",
    "KeyVaultSettings",
    "ListenerSettings",
    "NginxSettings",
    "SshSettings",
    "TargetKind",
    "TargetSettings",
    "TargetSettingsError",
    "TrustBundleSettings",
    "UnknownTargetKindError",
    "merged_settings",
    "parse_kind",
    "unknown_keys",
    "valid_keys",
    "validate_settings",
]


class TargetKind(StrEnum):
    """What a deployment target is. The value is what Target rows, blocks and the CLI spell."""

    SSH_NGINX = "ssh-nginx"
    SSH_HAPROXY = "ssh-haproxy"
    AWS_ACM = "aws-acm"
    AWS_ELBV2 = "aws-elbv2"
    AWS_IAM_ELBV2 = "aws-iam-elbv2"
    AZURE_KV = "azure-kv"
    TRUST_BUNDLE = "trust-bundle"


class UnknownTargetKindError(PermanentDeployError):
    """A kind that is not a TargetKind: ``kind`` is what was given."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.valid = tuple(k.value for k in TargetKind)
        super().__init__(f"unknown target kind {kind!r}; one of {', '.join(self.valid)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.kind,))


def parse_kind(kind: str | TargetKind) -> TargetKind:
    try:
        return TargetKind(kind)
    except ValueError:
        raise UnknownTargetKindError(str(kind)) from None


class TargetSettingsError(PermanentDeployError):
    """Settings a kind cannot take. ``unknown`` are keys the kind does not have, ``missing`` required keys
    not given, ``invalid`` maps a key (or ``""`` for a rule between keys) to what is wrong with its value,
    ``valid_keys`` every key the kind takes. The message names them all and never holds a value."""

    def __init__(self, kind: TargetKind, *, unknown: Iterable[str] = (), missing: Iterable[str] = (),
                 invalid: Mapping[str, str] | None = None, target: str | None = None) -> None:
        self.kind = TargetKind(kind)
        self.target = target
        self.unknown = tuple(sorted(unknown))
        self.missing = tuple(missing)
        self.invalid = dict(invalid or {})
        self.valid_keys = valid_keys(self.kind)
        parts = []
        if self.unknown:
            parts.append(f"unknown {self.kind} setting(s) {', '.join(self.unknown)}")
        if self.missing:
            parts.append(f"{self.kind} needs the setting(s) {', '.join(self.missing)}")
        parts += [f"{key} {reason}" if key else reason for key, reason in self.invalid.items()]
        text = "; ".join(parts) or f"invalid {self.kind} settings"
        super().__init__(f"{target + ': ' if target else ''}{text} (valid keys: {', '.join(self.valid_keys)})")

    @property
    def bad_keys(self) -> tuple[str, ...]:
        """Every key named as wrong: unknown, missing or with a value the kind cannot take."""
        return self.unknown + self.missing + tuple(key for key in self.invalid if key)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_settings_error, (self.kind, self.unknown, self.missing, self.invalid, self.target))


def _rebuild_settings_error(kind: TargetKind, unknown: tuple[str, ...], missing: tuple[str, ...],
                            invalid: dict[str, str], target: str | None) -> TargetSettingsError:
    return TargetSettingsError(kind, unknown=unknown, missing=missing, invalid=invalid, target=target)


# ------------------------------------------------------------------------------------------- models

class TargetSettings(BaseModel):
    """The settings of one kind of target: frozen, unknown keys refused, values never echoed in errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


_OCTAL_MODE = re.compile(r"^[0-7]{1,5}$")


class SshSettings(TargetSettings):
    """Settings every target on an SSH host has: where verify() handshakes, and what remove() does."""

    verify_host: str | None = Field(default=None, description="Where to handshake for verify(); default the "
                                                               "SSH host's address.")
    verify_port: int = Field(default=443, ge=1, le=65535, description="The TLS port verify() handshakes with.")
    verify_sni: str | None = Field(default=None, description="Server name to send in the handshake; default none.")
    verify_hostname: str | None = Field(default=None, description="Name the leaf must match; default verify_sni "
                                                                  "(none: no name check).")
    verify_trust: str | None = Field(
        default=None, validation_alias=AliasChoices("verify_trust", "trust_pem"),
        description="PEM text of CA certificates the served chain must lead to (default: the chain must be "
                    "complete); trust_pem is another name for it.")
    verify_timeout: float = Field(default=10.0, gt=0, description="Seconds to wait until the new certificate is "
                                                                  "served consistently.")
    verify_consecutive: int = Field(default=5, ge=1, description="Handshakes in a row that must show it.")
    command_timeout: float = Field(default=60.0, gt=0, description="Seconds for each remote command.")
    remove_previous: bool = Field(default=False, description="purge() (a confirmed retirement) also deletes the "
                                                             ".certpilot-previous backups of earlier deploys.")
    remove_command: str | None = Field(default=None, description="Run by remove() after the files are moved aside "
                                                                 "(e.g. a script that disables the site and "
                                                                 "reloads); default none: nothing is reloaded.")
    restore_command: str | None = Field(default=None, description="Run by restore() after the files are back, "
                                                                  "before the test and reload (e.g. a script that "
                                                                  "enables the site again); default none.")

    @model_validator(mode="before")
    @classmethod
    def _one_trust(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("verify_trust") and data.get("trust_pem"):
            raise ValueError("give verify_trust or trust_pem (another name for it), not both")
        return data

    @field_validator("verify_trust")
    @classmethod
    def _trust_parses(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            try:
                bundle = load_bundle(value.encode(), source="verify_trust")
            except ParseError:
                raise ValueError("is not PEM text of CA certificates") from None
            if bundle.private_keys:
                raise ValueError("holds a private key: give CA certificates only")
            if not bundle.certificates:
                raise ValueError("holds no certificate")
        return value

    def trust(self) -> tuple[x509.Certificate, ...]:
        """The CA certificates of verify_trust (none: the served chain must be complete)."""
        if not self.verify_trust or not self.verify_trust.strip():
            return ()
        return load_bundle(self.verify_trust.encode(), source="verify_trust").certificates


class NginxSettings(SshSettings):
    """An nginx site on an SSH host (kind ssh-nginx): its certificate and key files, test and reload."""

    model_config = ConfigDict(title="ssh-nginx settings")

    certificate_path: str = Field(min_length=1, description="The file nginx's ssl_certificate names: the leaf then "
                                                            "its intermediates (PEM).")
    key_path: str = Field(min_length=1, description="The file ssl_certificate_key names (PKCS#8 PEM, written 0600).")
    certificate_mode: str = Field(default="0644", description="Mode of the certificate file, octal digits.")
    test_command: str = Field(default="nginx -t", min_length=1,
                              description="Run before reloading; a non-zero exit fails the deploy and restores the "
                                          "previous pair (`nginx -s reload` exits 0 even when the new configuration "
                                          "fails to load, so it cannot be the test).")
    reload_command: str = Field(default="nginx -s reload", min_length=1,
                                description="Reloads nginx; in the lab `nginx -p PREFIX -c CONF -s reload`.")

    @field_validator("certificate_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = format(value, "04o")
        if not isinstance(value, str) or not _OCTAL_MODE.match(value) or int(value, 8) > 0o7777:
            raise ValueError("must be a file mode in octal digits, such as 0644")
        return value

    @model_validator(mode="after")
    def _two_files(self) -> NginxSettings:
        if self.key_path == self.certificate_path:
            raise ValueError("certificate_path and key_path are the same file; give nginx two files")
        return self

    @property
    def file_mode(self) -> int:
        """certificate_mode as a number."""
        return int(self.certificate_mode, 8)


class HaproxySettings(SshSettings):
    """A haproxy ``crt`` on an SSH host (kind ssh-haproxy): one PEM file, swapped through the runtime API or
    by a reload."""

    model_config = ConfigDict(title="ssh-haproxy settings")

    pem_path: str = Field(min_length=1, description="The file a `crt` names: leaf, intermediates, then the key "
                                                    "(written 0600); for the runtime API, the name haproxy knows it "
                                                    "by (`show ssl cert`). A ';' or a control character is refused.")
    runtime_socket: str | None = Field(default=None, description="Path on the host of a stats socket with `level "
                                                                 "admin`: the certificate is swapped in memory with "
                                                                 "set/commit ssl cert (no reload).")
    runtime_client: Literal["auto", "socat", "python3"] = Field(
        default="auto", description="How the socket is reached from the SSH session: auto (socat when the host "
                                    "has it, else python3), socat or python3.")
    reload_command: str | None = Field(default=None, description="Used instead of the runtime API when no "
                                                                 "runtime_socket is given (e.g. `systemctl reload "
                                                                 "haproxy`).")

    @model_validator(mode="after")
    def _a_way_to_apply(self) -> HaproxySettings:
        if not self.runtime_socket and not self.reload_command:
            raise ValueError("ssh-haproxy needs runtime_socket or reload_command")
        return self


def _arn_parts(arn: str) -> list[str] | None:
    parts = arn.split(":", 5)
    return parts if len(parts) == 6 and parts[0] == "arn" else None


class AcmSettings(TargetSettings):
    """One ACM certificate, re-imported in place (kind aws-acm)."""

    model_config = ConfigDict(title="aws-acm settings")

    region: str | None = Field(default=None, min_length=1, description="The ACM region (optional when "
                                                                       "certificate_arn is given: taken from it).")
    certificate_arn: str | None = Field(default=None, description="The ACM certificate to re-import into (optional: "
                                                                  "when absent, the first deploy imports a new one "
                                                                  "tagged certpilot:target=<target name>).")

    @field_validator("certificate_arn")
    @classmethod
    def _acm_arn(cls, value: str | None) -> str | None:
        parts = _arn_parts(value) if value else None
        if value and (parts is None or parts[2] != "acm" or not parts[3]):
            raise ValueError("is not an ACM certificate ARN")
        return value or None

    @model_validator(mode="after")
    def _one_region(self) -> AcmSettings:
        arn_region = self.certificate_arn.split(":")[3] if self.certificate_arn else None
        if not self.region and not arn_region:
            raise ValueError("aws-acm needs a region (or a certificate_arn)")
        if self.region and arn_region and arn_region != self.region:
            raise ValueError(f"certificate_arn is in {arn_region}, not {self.region}")
        return self

    @property
    def acm_region(self) -> str:
        """The region the certificate is in: ``region``, or the certificate ARN's."""
        return self.region or str(self.certificate_arn).split(":")[3]


class ListenerSettings(TargetSettings):
    """A load balancer listener's certificate (kinds aws-elbv2, stored in ACM, and aws-iam-elbv2, stored as an
    IAM server certificate)."""

    model_config = ConfigDict(title="aws-elbv2 and aws-iam-elbv2 settings")

    listener_arn: str = Field(description="The HTTPS or TLS listener (an ELBv2 listener ARN).")
    role: Literal["default", "sni"] = Field(
        default="default", description="default: the listener's default certificate, swapped with modify_listener; "
                                       "sni: an additional certificate (the new one is added, and the SNI entry this "
                                       "target put there before, or one for exactly the same DNS names, removed).")
    region: str | None = Field(default=None, description="Optional; must be the listener's region when given.")

    @field_validator("listener_arn")
    @classmethod
    def _listener_arn(cls, value: str) -> str:
        parts = _arn_parts(value)
        if parts is None or parts[2] != "elasticloadbalancing" or not parts[5].startswith("listener/"):
            raise ValueError("must be an ELBv2 listener ARN (arn:aws:elasticloadbalancing:REGION:ACCOUNT:listener/...)")
        return value

    @model_validator(mode="after")
    def _same_region(self) -> ListenerSettings:
        if self.region and self.region != self.listener_region:
            raise ValueError(f"the listener is in {self.listener_region}, not {self.region}")
        return self

    @property
    def listener_region(self) -> str:
        return self.listener_arn.split(":")[3]


_KEY_VAULT_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")


class KeyVaultSettings(TargetSettings):
    """One Azure Key Vault certificate (kind azure-kv): each deploy imports a new version."""

    model_config = ConfigDict(title="azure-kv settings")

    certificate_name: str = Field(description="The Key Vault certificate to import into: 1 to 127 letters, digits "
                                              "and dashes.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on every version imported.")
    purge_deleted: bool = Field(default=False, description="After a rollback deletes a certificate certpilot created, "
                                                           "purge it too, so the name can be used again at once (needs "
                                                           "the purge permission and no purge protection).")

    @field_validator("certificate_name")
    @classmethod
    def _vault_name(cls, value: str) -> str:
        if not _KEY_VAULT_NAME.match(value):
            raise ValueError("must be 1 to 127 letters, digits and dashes")
        return value


_ACCOUNT = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10})$")


class TrustBundleSettings(TargetSettings):
    """A private CA's trust bundle as a file on an SSH host (kind trust-bundle): the root and issuing CA
    certificates (PEM) of the CA that issues the managed certificate, written atomically and proven by
    reading it back (certpilot.trust_bundle)."""

    model_config = ConfigDict(title="trust-bundle settings")

    path: str = Field(min_length=2, description="Where the bundle goes, an absolute path, e.g. "
                                                "/usr/local/share/ca-certificates/lab-ca.crt.")
    mode: str = Field(default="0644", description="Mode of the file, octal digits; never writable by group or "
                                                  "others (they could make the host trust anything).")
    owner: str | None = Field(default=None, description="User to own the file (chown before it is renamed into "
                                                        "place); default: the SSH user.")
    group: str | None = Field(default=None, description="Group to own the file; default: the SSH user's.")
    reload_command: str | None = Field(default=None, description="Run after the file changed, e.g. "
                                                                 "update-ca-certificates; a non-zero exit restores "
                                                                 "the previous file. Default none.")
    command_timeout: float = Field(default=60.0, gt=0, description="Seconds for each remote command.")
    remove_previous: bool = Field(default=False, description="purge() (a confirmed retirement) also deletes the "
                                                             ".certpilot-previous backup of the last deploy.")
    remove_command: str | None = Field(default=None, description="Run by remove() after the file is moved aside "
                                                                 "(e.g. update-ca-certificates); default none.")
    restore_command: str | None = Field(default=None, description="Run by restore() after the file is back; "
                                                                  "default: reload_command.")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or any(c < " " for c in value):
            raise ValueError("must be an absolute path to a file, such as /usr/local/share/ca-certificates/ca.crt")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = format(value, "04o")
        if not isinstance(value, str) or not _OCTAL_MODE.match(value) or int(value, 8) > 0o7777:
            raise ValueError("must be a file mode in octal digits, such as 0644")
        if int(value, 8) & 0o022:
            raise ValueError("must not let group or others write the file (a relying party would trust whatever "
                             "they put there): use 0644 or narrower")
        return value

    @field_validator("owner", "group")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        if value is not None and not _ACCOUNT.match(value):
            raise ValueError("must be a user or group name (letters, digits, '_', '.', '-') or a number")
        return value

    @property
    def file_mode(self) -> int:
        """mode as a number."""
        return int(self.mode, 8)


SETTINGS: dict[TargetKind, type[TargetSettings]] = {
    TargetKind.SSH_NGINX: NginxSettings, TargetKind.SSH_HAPROXY: HaproxySettings, TargetKind.AWS_ACM: AcmSettings,
    TargetKind.AWS_ELBV2: ListenerSettings, TargetKind.AWS_IAM_ELBV2: ListenerSettings,
    TargetKind.AZURE_KV: KeyVaultSettings, TargetKind.TRUST_BUNDLE: TrustBundleSettings,
}


def valid_keys(kind: TargetKind | str) -> tuple[str, ...]:
    """Every key the kind's settings take (the other names of a key included), sorted."""
    fields = SETTINGS[parse_kind(kind)].model_fields
    return tuple(sorted(name for field_name, field in fields.items() for name in _names(field_name, field)))


def _names(field_name: str, field: Any) -> tuple[str, ...]:
    alias = field.validation_alias
    return tuple(str(a) for a in alias.choices) if isinstance(alias, AliasChoices) else (field_name,)


def unknown_keys(kind: TargetKind | str, settings: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(set(settings) - set(valid_keys(kind))))


def merged_settings(kind: TargetKind | str, base: TargetSettings | Mapping[str, Any], overrides: Mapping[str, Any],
                    target: str | None = None) -> TargetSettings:
    """``base`` overridden key by key by ``overrides`` (a key given under another of its names replaces it
    too), validated by the kind's model."""
    data = base.model_dump(exclude_none=True) if isinstance(base, TargetSettings) else dict(base)
    for field_name, field in SETTINGS[parse_kind(kind)].model_fields.items():
        names = _names(field_name, field)
        if any(name in overrides for name in names):
            for name in names:
                data.pop(name, None)
    return validate_settings(kind, {**data, **overrides}, target)


def _reason(error: Any) -> str:
    """pydantic's message for one error, as the end of a sentence that starts with the key."""
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if message.startswith("Input should be "):
        return "must be " + message.removeprefix("Input should be ")
    return message[:1].lower() + message[1:]


def validate_settings(kind: TargetKind | str, settings: Mapping[str, Any] | TargetSettings,
                      target: str | None = None) -> TargetSettings:
    """``settings`` as the kind's model. A model of the right type is returned as it is; a dict is
    validated. TargetSettingsError (naming the target, when given) says what is wrong; an unknown kind is
    UnknownTargetKindError."""
    kind = parse_kind(kind)
    model = SETTINGS[kind]
    if isinstance(settings, model):
        return settings
    if isinstance(settings, TargetSettings):
        settings = settings.model_dump(exclude_none=True)
    try:
        return model.model_validate(dict(settings))
    except ValidationError as exc:
        unknown: list[str] = []
        missing: list[str] = []
        invalid: dict[str, str] = {}
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                unknown.append(key)
            elif error["type"] == "missing":
                missing.append(key)
            else:
                invalid.setdefault(key, _reason(error))
        raise TargetSettingsError(kind, unknown=unknown, missing=missing, invalid=invalid, target=target) from None
