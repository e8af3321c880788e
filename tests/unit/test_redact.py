"""certpilot.errors.redact: the one function that decides what an error may show."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certpilot.errors import REDACTED_LENGTH, NotFoundError, PermanentError, redact


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - the test wants the traceback attached
        return caught


def test_a_cause_that_is_not_certpilots_is_shown_with_where_it_was_raised() -> None:
    text = redact(_raised(ValueError("Unable to find block document named web1 for block type ssh-host")))
    assert text.startswith("ValueError: Unable to find block document named web1 for block type ssh-host")
    assert "(at unit/test_redact.py:" in text


def test_certpilot_errors_show_their_message_alone() -> None:
    assert redact(_raised(NotFoundError("no managed certificate named 'web'"))) == "no managed certificate named 'web'"


@pytest.mark.parametrize("kind", [PermanentError, RuntimeError])
def test_key_material_in_a_message_is_withheld(kind: type[Exception]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    der_b64 = "".join(pem.splitlines()[1:-1])
    for message in (f"could not load {pem}", f"bad key {der_b64}", "PRIVATE KEY block at line 3 is truncated"):
        text = redact(_raised(kind(message)))
        assert der_b64[:40] not in text and "BEGIN" not in text
        assert text.startswith(f"{kind.__name__} (its message may hold key material and was withheld)")


def test_messages_are_one_bounded_line() -> None:
    text = redact(PermanentError("line one\nline two " + "word " * 500))
    assert "\n" not in text and text.startswith("line one line two")
    assert len(text) == REDACTED_LENGTH and text.endswith("...")
