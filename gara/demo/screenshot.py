"""Drive the demo page in a real headless Chromium (Debian's package, through Playwright): the
page test uses it, and so does the README's screenshot.

    python -m gara.demo.screenshot http://127.0.0.1:8765/ docs/demo.png --annotation 8

No browser is downloaded: Playwright launches the system's Chromium (``GARA_CHROMIUM``, default
``/usr/bin/chromium``; ``make test`` installs Debian's ``chromium`` when it is missing), with the
flags that keep it off the network on a closed machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import typer

CHROMIUM_ENV = "GARA_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# No sync, component updates or background fetches: on a closed network each is a refused
# connection, and none of them is the page's.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1500, "height": 820}


def chromium_path() -> str:
    path = os.environ.get(CHROMIUM_ENV, DEFAULT_CHROMIUM)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no Chromium there; install Debian's package (apt-get install "
                                f"chromium, as `make test` does) or set {CHROMIUM_ENV}")
    return path


@contextlib.contextmanager
def page_at(url: str) -> Iterator:
    """A Playwright page showing ``url`` once its sample list has loaded; the browser is closed after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#results .column').length > 0")
            yield page
        finally:
            browser.close()


def segment_annotation(page, annotation: int, corruption: str, severity: int, timeout_s: float = 120) -> None:
    """Choose a corruption and a ground-truth object on the page, and wait for every column's answer."""
    done = int(page.locator("#results").get_attribute("data-done") or 0)
    page.select_option("#corruption", corruption)
    page.eval_on_selector("#severity", "(e, v) => { e.value = v; e.dispatchEvent(new Event('change')); }",
                          str(severity))
    page.select_option("#annotation", str(annotation))
    # `done` counts answers whose masks are drawn (the page waits for their PNGs to decode).
    page.wait_for_function(f"Number(document.getElementById('results').dataset.done || 0) > {done}",
                           timeout=timeout_s * 1000)


def main(url: str = typer.Argument(..., help="The running demo, e.g. http://127.0.0.1:8765/"),
         out: Path = typer.Argument(..., help="PNG to write."),
         annotation: int = typer.Option(8, help="Ground-truth annotation id on the first sample."),
         corruption: str = typer.Option("fog"), severity: int = typer.Option(4)) -> None:
    """Screenshot of the demo after segmenting one ground-truth object under a corruption."""
    with page_at(url) as page:
        segment_annotation(page, annotation, corruption, severity)
        page.screenshot(path=str(out), full_page=True)
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
