"""Time `kontext-lora ui`: how long it takes to start answering, and how long a dataset page of 200 pairs takes.

    python scripts/bench_ui.py [--pairs 200] [--side 512]

Builds a folder dataset of N random (control, target, caption) pairs in a temporary project, starts the UI as a
user does (`python -m kontext_lora.cli ui --root <project> --port <free>`), and prints a table:
  start                 process start -> the first page answered
  dataset page (first)  the page's HTML: discovery, preflight of every image and the buckets (cold)
  thumbnails (first)    every thumbnail the page shows, made and cached on disk (sequential requests)
  dataset page (again)  the same page once preflight's result is cached (the files unchanged)
  thumbnails (cached)   every thumbnail again, served from the disk cache
  page + thumbnails     the page and all its thumbnails, cached, fetched 6 at a time as a browser does
  browser render        Debian's chromium (if installed) loading the page until its load event: the HTML
                        and the thumbnails in view (the rest load lazily as the page scrolls), cached
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def make_dataset(folder: Path, pairs: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for sub in ("control", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(pairs):
        pixels = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((side, side), Image.BILINEAR)
        image.save(folder / "control" / f"pair{index:04d}.jpg", quality=90)
        image.convert("L").convert("RGB").save(folder / "target" / f"pair{index:04d}.jpg", quality=90)
        (folder / "target" / f"pair{index:04d}.txt").write_text("make it black and white\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=300) as response:
        return response.read()


def browser_render(url: str) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url, wait_until="load")  # once, so the browser's own caches are as on a reload
        start = time.perf_counter()
        page.goto(url, wait_until="load")
        seconds = time.perf_counter() - start
        browser.close()
    return seconds


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        make_dataset(project / "data" / "pairs", args.pairs, args.side)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "kontext_lora.cli", "ui", "--root", str(project), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while True:
                try:
                    fetch(base + "/")
                    break
                except OSError:
                    if server.poll() is not None:
                        raise SystemExit("the UI exited before answering") from None
                    time.sleep(0.02)
            rows = [("start", time.perf_counter() - start)]
            page_url = base + "/dataset?" + urllib.parse.urlencode({"path": "data/pairs"})
            seconds, html = timed(lambda: fetch(page_url))
            rows.append(("dataset page (first)", seconds))
            text = html.decode()
            thumbs = sorted({part.split('"')[0] for part in text.split('src="/thumb?')[1:]})
            assert len(thumbs) == 2 * args.pairs, f"{len(thumbs)} thumbnails on the page"
            seconds, _ = timed(lambda: [fetch(f"{base}/thumb?{query.replace('&amp;', '&')}") for query in thumbs])
            rows.append(("thumbnails (first)", seconds))
            seconds, _ = timed(lambda: fetch(page_url))
            rows.append(("dataset page (again)", seconds))
            seconds, _ = timed(lambda: [fetch(f"{base}/thumb?{query.replace('&amp;', '&')}") for query in thumbs])
            rows.append(("thumbnails (cached)", seconds))

            def reload() -> None:
                fetch(page_url)
                with ThreadPoolExecutor(6) as pool:  # a browser's connections per host
                    list(pool.map(fetch, [f"{base}/thumb?{query.replace('&amp;', '&')}" for query in thumbs]))

            seconds, _ = timed(reload)
            rows.append(("page + thumbnails", seconds))
            if Path(CHROMIUM).is_file():
                rows.append(("browser render", browser_render(page_url)))
        finally:
            server.terminate()
            server.wait(timeout=30)

    print(f"kontext-lora ui, {args.pairs} pairs of {args.side}x{args.side} JPEGs ({os.cpu_count()} CPUs)")
    print(f"{'what':24s} {'seconds':>8s}")
    for name, seconds in rows:
        print(f"{name:24s} {seconds:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
