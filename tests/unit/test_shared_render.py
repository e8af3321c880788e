"""/metrics renders once for every scrape that asks while a render is made, or within ``reuse`` seconds after
(connectors.http_service._SharedRender; certpilot serves with no reuse: a later scrape sees the inventory as it is)."""

from __future__ import annotations

import asyncio
import threading
import time

from connectors.http_service import _SharedRender


class Renders:
    """A render that takes a while and counts how often it ran (on the worker threads)."""

    def __init__(self, seconds: float = 0.2, fail: bool = False) -> None:
        self.count, self.seconds, self.fail = 0, seconds, fail
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            self.count += 1
            n = self.count
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError(f"render {n} failed")
        return f"render {n}\n".encode()


def test_concurrent_scrapes_share_one_render_and_reuse_it_briefly() -> None:
    renders = Renders()
    shared = _SharedRender(renders, reuse=0.5)

    async def scrape() -> tuple[list[bytes], bytes, bytes]:
        together = await asyncio.gather(*(shared.get() for _ in range(50)))
        soon = await shared.get()  # within the reuse window: the same bytes
        await asyncio.sleep(0.6)
        return list(together), soon, await shared.get()  # after it: a new render

    together, soon, later = asyncio.run(scrape())
    assert set(together) == {b"render 1\n"} and all(body is together[0] for body in together)
    assert soon is together[0] and later == b"render 2\n" and renders.count == 2


def test_a_failed_render_fails_every_waiter_and_is_not_reused() -> None:
    renders = Renders(fail=True)
    shared = _SharedRender(renders, reuse=10.0)

    async def scrape() -> list[object]:
        return list(await asyncio.gather(*(shared.get() for _ in range(5)), return_exceptions=True))

    first = asyncio.run(scrape())
    assert all(isinstance(e, RuntimeError) and str(e) == "render 1 failed" for e in first), first
    renders.fail = False
    assert asyncio.run(shared.get()) == b"render 2\n"  # the failure was not kept


def test_without_reuse_each_scrape_after_a_render_renders_again() -> None:
    renders = Renders(seconds=0.01)
    shared = _SharedRender(renders, reuse=0.0)
    bodies = [asyncio.run(shared.get()) for _ in range(3)]
    assert bodies == [b"render 1\n", b"render 2\n", b"render 3\n"]
