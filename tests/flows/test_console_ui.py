"""The Prefect UI as the operator's console, loaded in a real headless browser (Debian's chromium) from a
real `prefect server start` while `certpilot serve` serves the deployments: the deployments page lists
every deployment of prefect.yaml with its schedule, and the run forms show their fields, the select of
choices with its options, the dry-run and deploy toggles, and the block picker. Each page's screenshot is
kept under the test's tmp directory (its path is printed)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from blocks.sources import SourceKind
from deployments import DEPLOYMENTS
from lab.ports import free_port
from lab.prefect_server import PrefectServer
from tests.flows.test_serve import Served, serve_env  # noqa: F401 (serve_env: the operator's environment fixture)

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: bash scripts/setup.sh --servers")
LOAD_SECONDS = 60  # one page load, the budget of virtual time included


@dataclass
class Element:
    """A table row or a run-form field of the page: its text, the toggles (role=switch: checked or not)
    and the options of the selects it holds."""

    text: list[str] = field(default_factory=list)
    label: str = ""
    switches: list[bool] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    @property
    def joined(self) -> str:
        return " ".join(self.text)


class Page(HTMLParser):
    """The DOM chromium dumps, as the table rows and the run-form fields it shows."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.dom = dom
        self.rows: list[Element] = []
        self.fields: list[Element] = []
        self.text: list[str] = []
        self._open: list[tuple[str, int, Element]] = []  # (tag, depth of that tag when opened, element)
        self._depth: dict[str, int] = {}
        self._in: list[str] = []  # tags whose text is not shown (script, style) or is a field's label
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag in ("script", "style") or "schema-form-property__label" in classes:
            self._in.append(tag)
        if tag in ("tr", "div"):
            self._depth[tag] = self._depth.get(tag, 0) + 1
            if tag == "tr":
                self._open.append((tag, self._depth[tag], Element()))
                self.rows.append(self._open[-1][2])
            elif "schema-form-property" in classes:
                self._open.append((tag, self._depth[tag], Element()))
                self.fields.append(self._open[-1][2])
        if attributes.get("role") == "switch" and self._open:
            self._open[-1][2].switches.append(attributes.get("aria-checked") == "true")
        if tag == "option" and self._open:
            self._open[-1][2].options.append(attributes.get("value") or "")

    def handle_endtag(self, tag: str) -> None:
        if self._in and self._in[-1] == tag:
            self._in.pop()
        if tag in ("tr", "div"):
            if self._open and self._open[-1][0] == tag and self._open[-1][1] == self._depth.get(tag, 0):
                self._open.pop()
            self._depth[tag] = self._depth.get(tag, 0) - 1

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if not text or (self._in and self._in[-1] in ("script", "style")):
            return
        self.text.append(text)
        for _, _, element in self._open:
            element.text.append(text)
        if self._in and self._in[-1] not in ("script", "style") and self._open:
            self._open[-1][2].label += text

    def field(self, name: str) -> Element:
        found = [f for f in self.fields if f.label.split(" (")[0] == name]
        assert found, f"no form field {name!r}; fields: {[f.label for f in self.fields]}"
        return found[0]

    def row(self, name: str) -> Element:
        found = [r for r in self.rows if r.text and r.text[0] == name]
        assert found, f"no row for {name!r}; rows: {[r.text[:1] for r in self.rows]}"
        return found[0]


def load(url: str, screenshot: Path, ready: str, profile: Path, width: int = 1600) -> Page:
    """The page at ``url`` as headless chromium renders it (the DOM, and a screenshot ``width`` pixels
    wide): the single-page app gets 15 s of virtual time; loaded again (at most three times) until its
    DOM shows ``ready``."""
    assert CHROMIUM is not None
    for _attempt in range(3):
        run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},1000",
                              "--virtual-time-budget=15000", f"--user-data-dir={profile}", f"--screenshot={screenshot}",
                              "--dump-dom", url], capture_output=True, text=True, timeout=LOAD_SECONDS, check=False)
        page = Page(run.stdout)
        if run.returncode == 0 and ready in " ".join(page.text):
            print(f"screenshot of {url}: {screenshot}")  # the test's artifact
            return page
        time.sleep(1)
    raise AssertionError(f"chromium did not render {url} showing {ready!r} (exit {run.returncode}): "
                         f"{run.stderr[-2000:]}\n{' '.join(page.text)[:2000]}")


UI_PAGE = 10  # deployments per page of the UI's list


def schedule_text(cron: str) -> str:
    """How the UI says the crons of prefect.yaml (minute, hour steps, a time of day), e.g. "At 17 minutes past
    the hour", "At 06:07 AM every day"."""
    minute, hour = cron.split()[:2]
    if minute.startswith("*/"):
        return f"Every {minute[2:]} minutes"
    if minute.isdigit() and hour.isdigit():
        h = int(hour)
        return f"At {(h - 1) % 12 + 1:02d}:{int(minute):02d} {'AM' if h < 12 else 'PM'} every day"
    return f"At {minute} minutes past the hour" + (f", every {hour[2:]} hours" if hour.startswith("*/") else "")


@pytest.fixture(scope="module")
def console(scheduling_prefect_server: PrefectServer, serve_env: dict[str, str],  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`certpilot serve` beside the server, until the API lists every deployment; their ids by name."""
    served = Served(serve_env, tmp_path_factory.mktemp("console-serve"), free_port())
    try:
        deadline = time.monotonic() + 60
        while True:
            assert served.process.poll() is None, f"certpilot serve exited:\n{served.output}"
            found = httpx.post(f"{scheduling_prefect_server.api_url}/deployments/filter", json={}, timeout=10).json()
            ids = {d["name"]: d["id"] for d in found}
            if {spec.name for spec in DEPLOYMENTS} <= set(ids):
                break
            assert time.monotonic() < deadline, f"deployments not served within 60 s:\n{served.output}"
            time.sleep(0.5)
        yield ids
    finally:
        if served.process.poll() is None:
            served.stop()


def test_the_console_lists_the_deployments_and_their_run_forms(console: dict[str, str],
                                                               scheduling_prefect_server: PrefectServer,
                                                               tmp_path: Path) -> None:
    url = scheduling_prefect_server.url
    pages = {  # name: (path, what the page shows once loaded, width: the list shows whole schedules from 2200 px)
        "deployments": ("/deployments", f"{len(console)} Deployments", 2200),
        "discover-deployment": (f"/deployments/deployment/{console['discover']}", "Next Run", 1600),
        **{name: (f"/deployments/deployment/{console[name]}/run", ready, 1600) for name, ready in (
            ("renew-certificate", "dry_run"), ("discover", "kinds"), ("import-inventory", "password_secret"))}}
    with ThreadPoolExecutor(len(pages)) as pool:  # the browsers mostly wait: load the pages side by side
        loading = {name: pool.submit(load, url + path, tmp_path / f"{name}.png", ready, tmp_path / f"chromium-{name}",
                                     width) for name, (path, ready, width) in pages.items()}
        listing, detail, renew, discover, importing = (loading[name].result() for name in pages)

    # The page says how many there are and lists the first UI_PAGE by name (the rest are on the next page).
    first_page = sorted(DEPLOYMENTS, key=lambda spec: spec.name)[:UI_PAGE]
    assert [r.text[0] for r in listing.rows if r.text and r.text[0] != "Deployment"] == [s.name for s in first_page]
    for spec in first_page:
        row = listing.row(spec.name)
        if spec.cron:
            assert schedule_text(spec.cron) in row.joined, (spec.name, row.joined)
        else:
            assert "past the hour" not in row.joined and "Every " not in row.joined, (spec.name, row.joined)

    schedule = schedule_text(next(spec.cron for spec in DEPLOYMENTS if spec.name == "discover") or "")
    shown = " ".join(detail.text)
    assert f"Schedules {schedule}" in shown  # the deployment's page: its schedule, and its next run made by it
    assert "Next Run discover" in shown and "auto-scheduled" in shown and "Scheduled for " in shown

    assert "Only say what the run would do" in renew.field("dry_run").joined
    assert renew.field("dry_run").switches == [False]  # a toggle, off
    assert renew.field("deploy").switches == [True]
    assert renew.field("name").switches == [] and "The managed certificate." in renew.field("name").joined

    kinds = discover.field("kinds")
    assert kinds.options == [kind.value for kind in SourceKind]  # a select of the source kinds
    assert "every saved block" in discover.field("sources").joined

    assert "Secret" in importing.field("password_secret").text  # the block picker, behind its type switch
    assert importing.field("import_keys").switches == [False]
