"""E-mail through an SMTP server, as a Prefect notification block (core Prefect has none).

``EmailNotification`` is configured in the Prefect UI like Prefect's own notification blocks, and
used the same way: by certpilot's alert routes (``email-notification/<name>`` in the alert policy)
and by Prefect automations' "send a notification" action. Slack, Microsoft Teams, PagerDuty and
custom webhooks need nothing from certpilot: Prefect's own blocks (``slack-webhook``,
``microsoft-teams-webhook``, ``pager-duty-webhook``, ``custom-webhook``) are named in the policy the
same way.

Every send has a timeout (connect, TLS, and each SMTP command). A failure is raised, never logged
and dropped: a certpilot TransientError (refused, timed out, the server said 4xx) or PermanentError
(rejected credentials, refused recipients, a 5xx), with no password in it.

Register with ``prefect block register -m blocks.notifications``.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import ClassVar, Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.abstract import NotificationBlock
from pydantic import ConfigDict, Field, HttpUrl, SecretStr, field_validator

from certpilot.errors import PermanentError, TransientError

DOCS = "https://github.com/certpilot/certpilot/blob/main/README.md#alerts"


class EmailNotification(NotificationBlock):
    """Send notifications as e-mail through an SMTP server (STARTTLS, implicit TLS, or plain)."""

    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name: ClassVar[str] = "Email notification"
    _block_type_slug: ClassVar[str] = "email-notification"
    _description: ClassVar[str] = "E-mail through an SMTP server, for certpilot's alerts and Prefect automations."
    _documentation_url: ClassVar[HttpUrl | None] = HttpUrl(DOCS)
    _code_example: ClassVar[str] = """
```python
from blocks.notifications import EmailNotification

EmailNotification.load("BLOCK_NAME").notify("body", subject="subject")
```
"""

    smtp_host: str = Field(description="The SMTP server's host name or address.")
    smtp_port: int = Field(default=587, ge=1, le=65535, description="587 for STARTTLS, 465 for TLS, 25 plain.")
    security: Literal["starttls", "ssl", "plain"] = Field(
        default="starttls", description="starttls: upgrade the connection (port 587); ssl: TLS from the start "
                                        "(port 465); plain: no encryption (a relay on a trusted network only).")
    from_address: str = Field(description="The sender, e.g. certpilot@example.com.")
    to_addresses: list[str] = Field(min_length=1, description="Recipients.")
    username: str | None = Field(default=None, description="Log in as this user (none: no login).")
    password: SecretStr | None = Field(default=None, description="The SMTP password.")
    trusted_ca_pem: str | None = Field(default=None, description="PEM CA certificates the server's certificate is "
                                                                 "verified against (none: the system's).")
    timeout_seconds: float = Field(default=10, gt=0, le=120, description="Per network operation, in seconds.")

    @field_validator("from_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if "@" not in value or any(c in value for c in "\r\n"):
            raise ValueError(f"{value!r} is not an e-mail address")
        return value.strip()

    @field_validator("to_addresses")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            cls._address(value)
        return [v.strip() for v in values]

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.trusted_ca_pem:
            context = ssl.create_default_context(cadata=self.trusted_ca_pem)
        return context

    def _message(self, body: str, subject: str | None) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.from_address
        message["To"] = ", ".join(self.to_addresses)
        message["Subject"] = " ".join((subject or "certpilot notification").split())
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = make_msgid(domain=self.from_address.rpartition("@")[2] or None)
        message.set_content(body)
        return message

    def send(self, body: str, subject: str | None = None) -> None:
        """Send one e-mail; TransientError or PermanentError naming the server if it is not accepted."""
        where = f"SMTP server {self.smtp_host}:{self.smtp_port}"
        message = self._message(body, subject)
        try:
            if self.security == "ssl":
                client: smtplib.SMTP = smtplib.SMTP_SSL(self.smtp_host, self.smtp_port, timeout=self.timeout_seconds,
                                                        context=self._context())
            else:
                client = smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout_seconds)
            with client:
                if self.security == "starttls":
                    client.starttls(context=self._context())
                if self.username:
                    client.login(self.username, self.password.get_secret_value() if self.password else "")
                refused = client.send_message(message)
            if refused:
                raise PermanentError(f"{where} refused recipients: {', '.join(sorted(refused))}")
        except smtplib.SMTPAuthenticationError as exc:
            raise PermanentError(f"{where} rejected the login of {self.username!r} ({exc.smtp_code})") from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise PermanentError(f"{where} refused recipients: {', '.join(sorted(exc.recipients))}") from None
        except smtplib.SMTPResponseException as exc:
            error = TransientError if 400 <= exc.smtp_code < 500 else PermanentError
            text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
            raise error(f"{where} answered {exc.smtp_code}: {' '.join(text.split())[:200]}") from None
        except (TimeoutError, socket.timeout):
            raise TransientError(f"{where} did not answer within {self.timeout_seconds:g} s") from None
        except smtplib.SMTPServerDisconnected as exc:
            if "timed out" in str(exc):  # smtplib's wording for a read that timed out
                raise TransientError(f"{where} did not answer within {self.timeout_seconds:g} s") from None
            raise TransientError(f"{where} closed the connection: {exc}") from None
        except ssl.SSLError as exc:
            raise PermanentError(f"{where}: TLS failed: {exc.reason or exc}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(f"{where} is unreachable: {type(exc).__name__}: {exc}") from None

    async def anotify(self, body: str, subject: str | None = None) -> None:
        await asyncio.to_thread(self.send, body, subject)

    @async_dispatch(anotify)
    def notify(self, body: str, subject: str | None = None) -> None:  # type: ignore[override]
        self.send(body, subject)
