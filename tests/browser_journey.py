"""The user's journey through hpchub, step by step, for tests/test_browser.py: each step screenshots the page
when it ends (or fails) into the test's own folder, and a failing step says which step failed, what it
expected, what the page showed and the hub log's tail, never a bare timeout. Also the HTTP-only pieces of
the same journey: the spawn form read and posted as a browser does, the progress stream, a notebook cell
run over the kernel's websocket."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterator


from conftest import require_service
from hubtools import Browser, Hub, execute_request, kernel_channels

CHROMIUM = Path("/usr/bin/chromium")
# headless Chromium as platform-notes.md says; Playwright gives every launch a fresh user-data dir
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
LOG_TAIL = 3000


def require_browser() -> None:
    """Debian's chromium and the playwright package, or a skip (a failure under CI=true)."""
    try:
        import playwright.sync_api  # noqa: F401
        have_playwright = True
    except ImportError:
        have_playwright = False
    require_service("Playwright", have_playwright,
                    "pip install 'hpchub[test]' (or scripts/setup-test-env.sh), which installs playwright")
    require_service("Chromium", shutil.which(str(CHROMIUM)) is not None,
                    "apt-get install chromium (scripts/setup-test-env.sh installs it)")


class Steps:
    """Numbered steps of one journey; with a `folder`, screenshots of `page` go there as NN-name.png."""

    def __init__(self, hub: Hub, folder: Path | None = None):
        self.hub = hub
        self.folder = folder
        self.page: Any = None       # the Playwright page screenshots are taken of
        self.timings: list[tuple[int, str, float]] = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            print(f"journey screenshots: {folder}")

    @contextmanager
    def step(self, number: int, title: str) -> Iterator[None]:
        """Run one step; any failure in it becomes an AssertionError naming the step, with the page's URL
        and text, the screenshot and the hub log's tail."""
        started = time.monotonic()
        try:
            yield
        except Exception as err:  # noqa: BLE001 - every failure is reported as this step's
            shot = self.screenshot(f"{number:02d}-failed")
            raise AssertionError(f"step {number} ({title}): {_first_line(err)}\n{self._page_report()}"
                                 f"  screenshot: {shot or 'none'}\n"
                                 f"  hub log tail:\n{self.hub.log()[-LOG_TAIL:]}") from err
        self.timings.append((number, title, time.monotonic() - started))
        self.screenshot(f"{number:02d}-{_slug(title)}")

    def screenshot(self, name: str) -> Path | None:
        if self.page is None or self.folder is None:
            return None
        path = self.folder / f"{name}.png"
        try:
            self.page.screenshot(path=str(path), full_page=True, timeout=10_000)
        except Exception:  # noqa: BLE001 - a page that cannot be captured must not hide the step's failure
            return None
        return path

    def _page_report(self) -> str:
        if self.page is None:
            return ""
        try:
            text = self.page.inner_text("body", timeout=5_000)
        except Exception as err:  # noqa: BLE001
            text = f"(no text: {_first_line(err)})"
        return f"  page: {self.page.url}\n  page shows: {' '.join(text.split())[:1500]}\n"

    def report(self) -> str:
        total = sum(seconds for _, _, seconds in self.timings)
        return "; ".join(f"{n} {seconds:.1f} s" for n, _, seconds in self.timings) + f"; total {total:.1f} s"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, AssertionError) else f"{type(err).__name__}: {text.splitlines()[0]}"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """`check()`'s first true result within `timeout` seconds, else None (the caller says what failed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


# --- the spawn form, the pending page's progress stream, over HTTP ---------------------------------

class FormInputs(HTMLParser):
    """What a browser posts from the spawn form: the enabled inputs' names and values (radios and options
    only when checked/selected; a disabled fieldset's inputs are not posted, but here every profile's are
    kept under its PROFILE. prefix and the caller picks)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.profiles: list[str] = []
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "input" and a.get("name"):
            if a.get("type") == "radio":
                if a["name"] == "profile":
                    self.profiles.append(a["value"])
                if "checked" in a:
                    self.values[a["name"]] = a["value"]
            else:
                self.values[a["name"]] = a.get("value", "")
        elif tag == "select":
            self._select = a.get("name")
        elif tag == "option" and self._select and ("selected" in a or self._select not in self.values):
            self.values[self._select] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def read_form(html: str) -> FormInputs:
    form = FormInputs()
    form.feed(html)
    return form


def progress_events(browser: Browser, user: str, timeout: float) -> list[dict]:
    """The events of the spawn page's progress stream, until ready or failed (or `timeout`)."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    with browser.session.get(f"{browser.url}/hub/api/users/{user}/server/progress", stream=True,
                             timeout=timeout, headers={"X-XSRFToken": browser.xsrf("/hub/")}) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if events[-1].get("ready") or events[-1].get("failed"):
                    break
            if time.monotonic() > deadline:
                break
    return events


async def run_cell(browser: Browser, user: str, kernel_id: str, code: str, timeout: float = 60) -> str:
    """Run `code` in the kernel over its websocket, as JupyterLab does; its stdout (an error raises)."""
    conn = await kernel_channels(browser.url, browser, user, kernel_id)
    msg_id, message = execute_request(user, code)
    conn.write_message(message)
    out: list[str] = []
    try:
        while True:
            raw = await asyncio.wait_for(conn.read_message(), timeout)
            if raw is None:
                raise AssertionError(f"the kernel's websocket closed; output so far: {''.join(out)!r}")
            message = json.loads(raw)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                raise AssertionError(f"the cell failed: {content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)
    finally:
        conn.close()
