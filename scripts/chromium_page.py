"""Open a local HTML page in headless Chromium: its DOM after scripts ran, a screenshot, and every
network request the page made (from Chromium's net log).

Used by ``tests/pages/test_pages_browser.py`` (the report pages render offline and fetch nothing)
and ``scripts/bench_report.py`` (how long a large page takes to load). Only the standard library
and the Debian ``chromium`` binary: no driver, no Python browser package.

    python scripts/chromium_page.py PAGE.html [--screenshot OUT.png]

prints the page's requests (none for a report page) and the seconds Chromium took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# A fresh profile and no background traffic of Chromium's own (updates, sync, sign-in); the
# net log still records what the browser itself sends, which page_requests() leaves out.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--no-pings", "--hide-scrollbars")


def find_chromium() -> str | None:
    """The Chromium binary (``CHROMIUM`` overrides), or None where none is installed."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@dataclass
class Opened:
    dom: str = ""
    stderr: str = ""
    seconds: float = 0.0
    requests: list[dict] = field(default_factory=list)
    screenshot: Path | None = None


def page_requests(net_log: Path) -> list[dict]:
    """The requests a page made, from a ``--log-net-log`` file: those started on behalf of a
    frame (an initiator origin, or a ``file://`` isolation key), not Chromium's own service calls
    (initiator "not an origin")."""
    log = json.loads(net_log.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    out = []
    for e in log.get("events", []):
        if names.get(e.get("type")) != "URL_REQUEST_START_JOB":
            continue
        p = e.get("params", {})
        if "url" not in p:
            continue  # the job's end event
        if p.get("initiator") != "not an origin" or "file://" in str(p.get("network_isolation_key", "")):
            out.append({"url": p.get("url"), "initiator": p.get("initiator"), "method": p.get("method")})
    return out


def open_page(page: Path, *, chromium: str | None = None, screenshot: Path | None = None, width: int = 1280,
              height: int = 2000, timeout: float = 120.0) -> Opened:
    """Load ``page`` twice (DOM with net log; then the screenshot, when asked) in fresh profiles."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (Debian / Ubuntu: apt-get install chromium)")
    url = Path(page).resolve().as_uri()
    out = Opened()
    with tempfile.TemporaryDirectory(prefix="agcnn-chromium-") as tmp:
        net = Path(tmp) / "net.json"
        cmd = [chromium, *FLAGS, f"--user-data-dir={tmp}/profile", f"--log-net-log={net}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out.seconds = time.perf_counter() - t0
        out.dom, out.stderr = done.stdout, done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
        out.requests = page_requests(net) if net.is_file() else [{"url": "(no net log written)"}]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            cmd = [chromium, *FLAGS, f"--user-data-dir={tmp}/profile2", f"--window-size={width},{height}",
                   f"--screenshot={screenshot}", url]
            subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
            out.screenshot = screenshot
    return out


def print_pdf(page: Path, pdf: Path, *, chromium: str | None = None, timeout: float = 120.0) -> Path:
    """Print ``page`` to ``pdf`` as the browser's print dialog would (print CSS applied)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (Debian / Ubuntu: apt-get install chromium)")
    pdf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agcnn-chromium-") as tmp:
        cmd = [chromium, *FLAGS, f"--user-data-dir={tmp}/profile", "--no-pdf-header-footer", f"--print-to-pdf={pdf}",
               Path(page).resolve().as_uri()]
        subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return pdf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    opened = open_page(args.page, screenshot=args.screenshot)
    print(json.dumps({"seconds": round(opened.seconds, 3), "dom_chars": len(opened.dom), "requests": opened.requests}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
