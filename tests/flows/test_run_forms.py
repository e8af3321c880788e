"""The deployments as operators meet them in the Prefect UI, against a real Prefect server: run forms
from each deployment's parameter schema (choices as enums, dry runs as toggles, blocks as pickers),
dry runs that say what they would do and change nothing, and a scheduled discover that scans every
registered source block, or says plainly that there is none."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from sqlmodel import func, select

import blocks
from blocks.azure import AzureKeyVaultBlock
from blocks.sources import SOURCE_BLOCKS, SourceKind
from blocks.ssh import SshHostBlock
from blocks.tls_scan import TlsScanBlock
from certpilot import history, inventory, managed, targets
from certpilot.database import get_engine, read_session, write_session
from certpilot.dry_run import DeploymentPreview, DuePreview, RenewalPreview
from certpilot.models import Certificate, Location, PrivateKey, Target
from certpilot.x509info import describe_certificate
from deployments import runner_deployments
from flows.deploy import deploy_certificate
from flows.discover import discover
from flows.renew import renew_certificate, renew_due
from lab import tls_farm
from tasks.discovery import registered_sources
from tests.flows.test_renew_flows import ACTOR, ISSUER, _add, _artifacts, _current, _logs, _task_runs
from tests.flows.test_renew_flows import issuer_block_types, pki  # noqa: F401 (fixtures)


# ------------------------------------------------------------------------------------------ run forms

def _schemas() -> dict[str, dict[str, Any]]:
    return {d.name: d._parameter_openapi_schema.model_dump() for d in runner_deployments()}


def _resolve(schema: dict[str, Any], prop: dict[str, Any]) -> dict[str, Any]:
    """A property's schema with a ``$ref`` (also inside anyOf, items) replaced by its definition."""
    if "$ref" in prop:
        return schema["definitions"][prop["$ref"].rsplit("/", 1)[1]]
    for key in ("anyOf", "items"):
        if key in prop:
            inner = prop[key]
            found = [_resolve(schema, p) for p in (inner if isinstance(inner, list) else [inner])]
            return {**prop, key: found if isinstance(inner, list) else found[0]}
    return prop


def test_run_forms_offer_choices_toggles_and_block_pickers() -> None:
    """What Prefect's UI renders the run forms from: enums as selects, booleans as toggles, block
    references as pickers of saved blocks."""
    schemas = _schemas()
    discover_schema = schemas["discover"]
    kinds = _resolve(discover_schema, discover_schema["properties"]["kinds"])
    assert kinds["type"] == "array" and kinds["items"]["enum"] == [k.value for k in SourceKind]
    assert kinds["default"] == [k.value for k in SourceKind]
    assert "sources" not in discover_schema["required"]  # the schedule's default: every registered source

    for name in ("renew-certificate", "renew-due", "deploy-certificate"):
        toggle = schemas[name]["properties"]["dry_run"]
        assert (toggle["type"], toggle["default"]) == ("boolean", False), name
        assert "nothing" in toggle["description"], name
    assert schemas["renew-certificate"]["properties"]["deploy"]["type"] == "boolean"

    importing = schemas["import-inventory"]
    picker = _resolve(importing, importing["properties"]["password_secret"])
    secret = next(option for option in picker["anyOf"] if option.get("type") == "object")
    assert secret["block_type_slug"] == "secret" and picker["default"] is None
    assert schemas["deploy-certificate"]["properties"]["concurrency"]["maximum"] == 16
    for name in schemas:  # every deployment
        assert all(prop.get("description") for prop in schemas[name]["properties"].values()), name  # each explained


def _block_classes() -> list[type[Block]]:
    found = []
    for module in pkgutil.iter_modules(blocks.__path__):
        loaded = importlib.import_module(f"blocks.{module.name}")
        found += [c for _, c in inspect.getmembers(loaded, inspect.isclass)
                  if issubclass(c, Block) and c is not Block and c.__module__ == loaded.__name__]
    return found


def test_every_block_has_a_required_field() -> None:
    """A block whose fields all have defaults makes Prefect refuse a run of a deployment whose parameter
    default is such a block (409, "valid under each of" a oneOf): every block here needs one field."""
    classes = _block_classes()
    assert {c.__name__ for c in classes} >= {"TlsScanBlock", "SshHostBlock", "AwsAccountBlock", "AzureKeyVaultBlock",
                                              "PrivateCABlock", "AcmeIssuerBlock", "DeploymentTargetBlock"}
    for block in classes:
        assert any(f.is_required() for f in block.model_fields.values()), f"{block.__name__} has no required field"
    for kind, block in SOURCE_BLOCKS.items():
        assert block.get_block_type_slug() == kind.value


# ------------------------------------------------------------------------------------------ dry runs

def _head(engine: sa.Engine) -> int:
    with read_session(engine) as session:
        return history.audit_head(session)


def _keys(engine: sa.Engine) -> int:
    with read_session(engine) as session:
        return session.exec(select(func.count()).select_from(PrivateKey)).one()


def test_renewal_dry_runs_say_what_they_would_do_and_do_nothing(pki: sa.Engine) -> None:
    _add(pki, "dry-1", dns=("dry-1.example.test",))
    _add(pki, "dry-2", issuer="private-ca/no-such-ca")
    head, keys = _head(pki), _keys(pki)

    state = renew_certificate(name="dry-1", dry_run=True, return_state=True)
    assert state.is_completed(), state.message
    preview = state.result()
    assert isinstance(preview, RenewalPreview) and preview.issuer_problem is None
    run_id = state.state_details.flow_run_id
    [artifact] = [a for a in _artifacts_of(run_id) if a.key is None]
    assert "DRY RUN: nothing was renewed" in artifact.data and "ec-p256 key" in artifact.data
    assert "dry-1.example.test" in artifact.data and f"issuer {ISSUER}" in artifact.data
    assert "DRY RUN" in _logs(run_id)
    assert {t.name for t in _task_runs(run_id)} == {"plan-dry-1", "preview-dry-1"}
    assert all("certificate:dry-1" in t.tags for t in _task_runs(run_id))

    blocked = renew_certificate(name="dry-2", dry_run=True)
    assert isinstance(blocked, RenewalPreview)
    assert blocked.issuer_problem and "private-ca/no-such-ca" in blocked.issuer_problem
    assert any(line.startswith("BLOCKED: issuer block private-ca/no-such-ca") for line in blocked.lines())

    due = renew_due(dry_run=True)
    assert isinstance(due, DuePreview)
    assert {"dry-1", "dry-2"} <= {d.name for d in due.due}
    assert (_head(pki), _keys(pki)) == (head, keys)  # no audit event, no key
    assert _current(pki, "dry-1") is None and _current(pki, "dry-2") is None


def _artifacts_of(run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def test_deployment_dry_run_lists_the_waves_and_the_missing_blocks(pki: sa.Engine) -> None:
    _add(pki, "dry-web")
    assert renew_certificate(name="dry-web", deploy=False).renewal is not None
    SshHostBlock(address="127.0.0.1", port=2, user="deploy", private_key="not used by a dry run",
                 known_hosts="[127.0.0.1]:2 ssh-ed25519 AAAA").save("dry-web-host", overwrite=True)
    settings = {"certificate_path": "/etc/ssl/web.pem", "key_path": "/etc/ssl/web.key"}
    with write_session(pki) as session:
        for name, block in (("a-nginx", "ssh-host/dry-web-host"), ("b-nginx", "ssh-host/dry-web-host"),
                            ("c-nginx", "ssh-host/gone")):
            targets.add(session, "dry-web", name, "ssh-nginx", block, settings, ACTOR)
    head = _head(pki)

    preview = deploy_certificate("dry-web", canary="b-nginx", concurrency=1, dry_run=True)

    assert isinstance(preview, DeploymentPreview)
    assert [[t.name for t in wave] for wave in preview.waves] == [["b-nginx"], ["a-nginx"], ["c-nginx"]]
    assert [t.name for t in preview.blocked] == ["c-nginx"] and "ssh-host/gone" in (preview.blocked[0].block_problem or "")
    text = "\n".join(preview.lines())
    assert "canary: b-nginx" in text and "deploy and verify (last verified serving none)" in text
    assert _head(pki) == head  # nothing recorded, nothing changed
    with read_session(pki) as session:
        assert {t.desired_fingerprint for t in session.exec(select(Target))} == {None}


def test_deployment_task_runs_carry_the_certificate_tag(pki: sa.Engine) -> None:
    _add(pki, "tag-web")
    renew_certificate(name="tag-web", deploy=False)
    with write_session(pki) as session:
        targets.add(session, "tag-web", "only", "ssh-nginx", "ssh-host/tag-web-gone",
                    {"certificate_path": "/x.pem", "key_path": "/x.key"}, ACTOR)
    state = deploy_certificate("tag-web", return_state=True)
    assert state.is_failed() and "ssh-host/tag-web-gone" in (state.message or "")
    runs = _task_runs(state.state_details.flow_run_id)
    deploys = [t for t in runs if t.name == "deploy-tag-web-only"]
    assert deploys and deploys[0].state.is_failed()
    for t in runs:
        if t.name.startswith(("deploy-", "plan-deployment")):
            assert "certificate:tag-web" in t.tags, t.name
    [artifact] = _artifacts(state.state_details.flow_run_id, "certificate-tag-web")
    assert "# tag-web: what deploy-certificate run 'deploy-tag-web' did" in artifact.data


# ------------------------------------------------------------------------------------------ discover

@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tls_farm.TlsFarm]:
    with tls_farm.TlsFarm.run(tmp_path_factory.mktemp("console-farm"), tls_farm.plan(2)) as running:
        yield running


def _forget_saved(slug: str) -> None:
    """Delete every saved block of type ``slug`` from the session's server (none of these tests need one)."""
    with get_client(sync_client=True) as client:
        try:
            documents = client.read_block_documents_by_type(slug, include_secrets=False)
        except Exception:  # noqa: BLE001 - the type was never registered: nothing saved
            return
        for document in documents:
            try:
                client.delete_block_document(document.id)
            except ObjectNotFound:
                pass


def test_scheduled_discover_scans_every_registered_source(farm: tls_farm.TlsFarm, prefect_server: None,
                                                          certpilot_home: Path) -> None:
    TlsScanBlock(targets=[f"127.0.0.1:{e.port}" for e in farm.endpoints], timeout_seconds=1.0,
                 trust_bundle_pem=farm.ca.root.public_bytes(serialization.Encoding.PEM).decode()).save(
        "console-farm", overwrite=True)
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot used\n-----END OPENSSH PRIVATE KEY-----\n"
    SshHostBlock(address="127.0.0.1", user="deploy", private_key=key, known_hosts="x").save(
        "console-deploy-only", overwrite=True)  # no discovery globs: a deploy target, not a source
    SshHostBlock(address="127.0.0.1", user="deploy", private_key=key, known_hosts="x",
                 discovery_globs=["/etc/ssl/*.pem"]).save("console-files", overwrite=True)
    ssh_sources = registered_sources.fn((SourceKind.SSH_HOST,))  # the plain function, outside a flow
    assert "ssh-host/console-files" in ssh_sources and "ssh-host/console-deploy-only" not in ssh_sources

    served = farm.endpoints[0]  # a managed certificate's certificate, not yet seen where it is served
    with write_session(get_engine()) as session:
        managed.add(session, managed.ManagedSpec(name="farm-web", dns_names=served.names, issuer=ISSUER,
                                                 owner="platform"), ACTOR)
        record = describe_certificate(x509.load_der_x509_certificate(served.chain[0]))
        inventory.upsert(session, [inventory.Observation(record, None, "issued")], ACTOR)
        session.execute(sa.update(Certificate).where(Certificate.fingerprint_sha256 == served.fingerprint)
                        .values(managed_certificate_id=managed.get(session, "farm-web").id))

    state = discover(kinds=(SourceKind.TLS_SCAN,), return_state=True)  # the deployment's default sources

    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    assert "discover-tls-scan-console-farm" in {t.name for t in _task_runs(run_id)}
    assert "discovering with every registered source: " in _logs(run_id)
    with read_session(get_engine()) as session:
        seen = {loc.locator for loc in session.exec(select(Location).where(Location.source == "tls-scan:console-farm"))}
    assert seen == {e.locator for e in farm.endpoints}
    [history_page] = _artifacts(run_id, "certificate-farm-web")  # the managed certificate's finding, in its history
    assert "location.added" in history_page.data and served.locator in history_page.data


def test_discover_with_no_registered_source_completes_saying_so(prefect_server: None, certpilot_home: Path) -> None:
    AzureKeyVaultBlock.register_type_and_schema()
    _forget_saved("azure-key-vault")
    state = discover(kinds=(SourceKind.AZURE_KEY_VAULT,), return_state=True)
    assert state.is_completed()
    assert "no source block is registered (azure-key-vault): nothing to discover" in (state.message or "")
    run_id = state.state_details.flow_run_id
    assert "no source block is registered" in _logs(run_id)
    [artifact] = _artifacts(run_id, "inventory")
    assert "**no source block is registered (azure-key-vault)" in artifact.data
    assert state.result().sources == ()


def test_every_flow_and_task_of_renewal_deployment_and_discovery_has_a_timeout() -> None:
    """A black-holed CA or host must fail the run within a bound, not hang it: every flow and task here
    has its own timeout (each network call inside has a shorter one of its own)."""
    from prefect import Flow, Task

    modules = ["flows.renew", "flows.deploy", "flows.discover", "flows.import_inventory", "tasks.renewal",
               "tasks.deployment", "tasks.discovery", "tasks.history"]
    found = {}
    for name in modules:
        module = importlib.import_module(name)
        found.update({f"{name}.{attr}": obj for attr, obj in vars(module).items()
                      if isinstance(obj, (Flow, Task)) and obj.__module__ == name})
    assert len(found) >= 25
    missing = [name for name, obj in found.items() if not obj.timeout_seconds]
    assert missing == [], f"no timeout: {missing}"
