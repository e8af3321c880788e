"""blocks.loading.load_block against a real Prefect server: a missing block is a BlockNotFoundError
naming the reference (a field, kept through pickling, shown by redact), not a bare ValueError."""

from __future__ import annotations

import pickle

import pytest
from prefect.blocks.system import Secret

from blocks.loading import load_block
from certpilot.errors import BlockNotFoundError, PermanentError, redact


def test_a_saved_block_is_loaded() -> None:
    Secret(value="not-a-real-secret").save("block-loading-test", overwrite=True)
    assert load_block("secret/block-loading-test").get() == "not-a-real-secret"


@pytest.mark.parametrize(("reference", "detail"), [
    ("secret/no-such-block", "Unable to find block document named no-such-block"),
    ("no-such-type/anything", "no-such-type"),
    ("no-slash", "a block reference is <block-type-slug>/<block-name>"),
    ("secret/", "a block reference is <block-type-slug>/<block-name>"),
])
def test_a_missing_block_is_named_by_its_cause(reference: str, detail: str) -> None:
    with pytest.raises(BlockNotFoundError) as missing:
        load_block(reference)
    error = missing.value
    assert isinstance(error, PermanentError) and error.block == reference and detail in error.detail
    assert str(error).startswith(f"block {reference!r} not found")
    assert redact(error) == str(error)  # it carries no secret: shown whole
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is BlockNotFoundError and vars(copy) == vars(error)
