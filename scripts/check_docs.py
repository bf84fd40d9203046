"""Build the docs and check every page in headless Chromium, offline, as a reader would see it.

    python scripts/check_docs.py SCREENSHOT_DIR [--chromium /usr/bin/chromium]

Builds the site (``mkdocs build --strict``), serves it on 127.0.0.1 and opens each page in
Debian's Chromium (driven by Playwright; no browser download). A page fails on:

- a console error or an uncaught exception;
- a request that fails or answers 400 or more (a missing script, font or image), and any request
  to another host (the site must work with no network: such requests are blocked and reported);
- an image that does not load, or an internal link to a missing page or anchor;
- TeX left unrendered: a ``.arithmatex`` element that MathJax did not typeset or typeset with
  no glyphs, a MathJax error, raw TeX (``\\(``, ``\\[``, ``$$``, ``\\command``) in the page's
  text outside code, or a backslash drawn inside ``\\text{...}``.

It saves a full-page PNG of each page into SCREENSHOT_DIR. Before the site, it checks a page
made broken on purpose and fails unless each check above catches its fault. Needs the ``docs``
extra and Chromium (``apt-get install chromium``). Exits 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag

from playwright.sync_api import Browser, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

# The promises of the pages this check proves (scripts/promises.py reads this).
PROMISES = ("docs-offline",)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MATH_TIMEOUT_MS = 20_000

# In the page: what a reader would see that is wrong, once MathJax has typeset.
PAGE_REPORT_JS = r"""() => {
  const math = [...document.querySelectorAll('.arithmatex')];
  const text = document.body.cloneNode(true);
  text.querySelectorAll('pre, code, script, style, mjx-container').forEach(e => e.remove());
  const raw = text.textContent.match(/\\\(|\\\)|\\\[|\\\]|\$\$|\\[A-Za-z]{2,}/g) || [];
  return {
    formulas: math.length,
    unrendered: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent),
    // Typeset, but drawn with no glyphs (their styles missing): blank space on the page.
    blank: [...document.querySelectorAll('mjx-container')].filter(c => {
      const glyph = c.querySelector('mjx-c');
      return glyph && ['none', 'normal', ''].includes(getComputedStyle(glyph, '::before').content);
    }).length,
    // A backslash drawn inside \text{...}: an escape that TeX's text mode does not take.
    text_escapes: [...document.querySelectorAll('mjx-mtext mjx-c.mjx-c5C')].map(
      e => e.closest('mjx-container').textContent),
    errors: [...document.querySelectorAll('mjx-merror')].map(
      e => e.getAttribute('data-mjx-error') || e.textContent),
    raw: [...new Set(raw)],
    images: document.images.length,
    broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0)
      .map(i => i.getAttribute('src')),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  };
}"""

BROKEN_PAGE = r"""<!doctype html><html><head><meta charset="utf-8"><title>broken</title></head>
<body><h1 id="top">A page broken on purpose</h1>
<p><span class="arithmatex">\(\eta\)</span> and $$x$$</p>
<img src="missing.png" alt="missing">
<img src="http://example.invalid/remote.png" alt="remote">
<a href="no-such-page/">a broken link</a> <a href="#no-such-anchor">a broken anchor</a>
<a href="#top">a good anchor</a>
<script>console.error("boom");</script>
</body></html>
"""
# Each fault of BROKEN_PAGE, as a piece of the problem that reports it.
EXPECTED_FAULTS = [
    "console error: boom",
    "unrendered TeX",
    "raw TeX",
    "broken image missing.png",
    "request to another host: http://example.invalid/remote.png",
    "status 404",
    "broken link",
    "broken anchor",
]


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)


@contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on a free port of 127.0.0.1; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@functools.cache
def _fetch_ids(url: str) -> tuple[int, frozenset[str]]:
    """HTTP status of a local URL and, for HTML, the ids in it."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            status = response.status
            html = "html" in response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, frozenset()
    parser = _Anchors()
    if html:
        parser.feed(body.decode("utf-8", "replace"))
    return status, frozenset(parser.ids)


def check_links(links: list[str], base: str) -> list[str]:
    problems = []
    for link in sorted(set(links)):
        if not link.startswith(base):
            continue  # another site: not followed, so no network is needed
        url, fragment = urldefrag(link)
        status, ids = _fetch_ids(url)
        if status >= 400:
            problems.append(f"broken link {link} (status {status})")
        elif fragment and fragment not in ids:
            problems.append(f"broken anchor {link}")
    return problems


def check_page(browser: Browser, url: str, base: str, screenshot: Path) -> tuple[list[str], dict]:
    """Open one page; returns its problems and the page's report."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    def route(route_: object) -> None:
        request = route_.request  # type: ignore[attr-defined]
        if request.url.startswith(base) or request.url.startswith("data:"):
            route_.continue_()  # type: ignore[attr-defined]
        else:
            problems.append(f"request to another host: {request.url}")
            route_.abort()  # type: ignore[attr-defined]

    page.route("**/*", route)
    page.on(
        "console",
        lambda msg: problems.append(f"console error: {msg.text}") if msg.type == "error" else None,
    )
    page.on("pageerror", lambda exc: problems.append(f"uncaught exception: {exc}"))
    page.on(
        "response",
        lambda r: problems.append(f"status {r.status}: {r.url}") if r.status >= 400 else None,
    )
    page.goto(url, wait_until="networkidle")
    if page.locator(".arithmatex").count():
        if page.evaluate("() => window.MathJax === undefined || !MathJax.startup"):
            problems.append("the page has maths but MathJax did not load")
        else:
            # A time-out is reported below, formula by formula, as unrendered TeX.
            with contextlib.suppress(PlaywrightTimeoutError):
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.arithmatex')]"
                    ".every(e => e.querySelector('mjx-container'))",
                    timeout=MATH_TIMEOUT_MS,
                )
    page.evaluate("() => document.fonts.ready.then(() => true)")
    report = page.evaluate(PAGE_REPORT_JS)
    problems += [f"unrendered TeX: {tex!r}" for tex in report["unrendered"]]
    if report["blank"]:
        problems.append(f"{report['blank']} formulas typeset with no glyphs (blank)")
    problems += [f"MathJax error: {error}" for error in report["errors"]]
    problems += [f"raw TeX in a formula's text: {tex!r}" for tex in report["text_escapes"]]
    problems += [f"raw TeX in the text: {tex!r}" for tex in report["raw"]]
    problems += [f"broken image {src}" for src in report["broken_images"]]
    problems += check_links(report["links"], base)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return problems, report


def pages_of(site: Path) -> list[str]:
    """Paths of the site's pages, ``""`` for the home page."""
    pages = [p.parent.relative_to(site).as_posix() for p in site.rglob("index.html")]
    return sorted("" if p == "." else p + "/" for p in pages if not p.startswith("javascripts"))


def self_test(browser: Browser, shots: Path) -> list[str]:
    """The checks, run on BROKEN_PAGE: a fault that no check catches is a problem."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.html").write_text(BROKEN_PAGE)
        with serve(Path(tmp)) as base:
            found, _ = check_page(browser, base, base, shots / "_self-test.png")
    missed = [fault for fault in EXPECTED_FAULTS if not any(fault in p for p in found)]
    good_anchor = [p for p in found if p.endswith("#top")]
    return [f"self-test: the check for {fault!r} did not fire" for fault in missed] + [
        f"self-test: a good anchor was reported: {p}" for p in good_anchor
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("screenshots", type=Path, help="folder for one PNG per page")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser to drive")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
        subprocess.run(build, cwd=ROOT, check=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            failures = self_test(browser, args.screenshots)
            pages = pages_of(site)
            with serve(site) as base:
                for path in pages:
                    shot = args.screenshots / f"{path.strip('/').replace('/', '-') or 'index'}.png"
                    problems, report = check_page(browser, base + path, base, shot)
                    status = "FAIL" if problems else "ok"
                    print(
                        f"{status:4} /{path:<16} {report['formulas']:3} formulas (rendered), "
                        f"{report['images']} images, {len(report['links'])} links -> {shot}"
                    )
                    failures += [f"/{path}: {problem}" for problem in problems]
            browser.close()
    for failure in failures:
        print(failure)
    print(f"docs: {len(pages)} pages checked in Chromium, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
