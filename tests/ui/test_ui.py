"""`kontext-lora ui` driven in a real headless browser (Debian's chromium through Playwright), over a copy of the
example project: a caption fixed on disk, a config error shown at its key, the tiny example run launched, watched,
stopped, resumed and its adapter downloaded, a sweep's summary opened. Plus the refusals: paths outside --root,
other network interfaces, other Host names.

The server runs as `python -m kontext_lora.cli ui` in a subprocess, as a user starts it. With
KONTEXT_LORA_UI_SCREENSHOTS=<folder> set, each page's 1280x800 screenshot is also written there (docs/images).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from safetensors import safe_open

from kontext_lora.model.tiny import make_tiny_model
from kontext_lora.train import checkpoint

from ..conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
RUN_DIR = "runs/ui_tiny"
# The tiny example job made short: seconds on 2 cores, a validation grid every 4 steps.
RUN_FIELDS = {
    "train.steps": "40",
    "validation.every": "4",
    "validation.steps": "8",
    "output.dir": RUN_DIR,
    "output.save_every": "0",
    "logging.report_to": "none",
}


# The #live panel is swapped whole every second: the counter may be missing for an instant.
STEP_AT_LEAST = "n => { const e = document.querySelector('#step-counter'); return e && Number(e.textContent) >= n; }"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder: the example configs and data, the tiny model where tiny_bw.yaml expects it, and a small
    sweep file."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copytree(REPO / "data_examples" / "bw", root / "data_examples" / "bw")
    make_tiny_model(root / "runs" / "tiny-kontext")  # the example's pretrained editor: the grids show its edits
    (root / "configs" / "examples" / "sweeps" / "ui_sweep.yaml").write_text(
        "name: ui_sweep\ndir: runs/sweeps/ui_sweep\n"
        "fixed: {train.steps: 6, data.resolution: 32, validation.every: 0, output.save_every: 0,"
        " logging.report_to: none, model.max_sequence_length: 8}\n"
        "grid: {train.lr: [1.0e-4, 1.0e-2]}\n"
    )
    return root


@pytest.fixture(scope="module")
def sweep_run(project: Path):
    """`kontext-lora sweep` of two tiny runs, trained while the other tests run (the sweep test waits for it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(project.parent / "sweep.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kontext_lora.cli", "sweep", "--config", "configs/examples/tiny_bw.yaml",
             "--sweep", "configs/examples/sweeps/ui_sweep.yaml"],
            cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(project: Path, sweep_run):
    """The UI serving `project` on a free port of 127.0.0.1: (base url, port)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(project.parent / "ui.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "kontext_lora.cli", "ui", "--root", str(project), "--port", str(port)],
        cwd=project.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/", timeout=5).read()
            break
        except OSError:  # not listening yet, or too slow to answer
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("the UI did not start:\n" + (project.parent / "ui.log").read_text()[-3000:])
            time.sleep(0.1)
    yield base, port
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install -y chromium) to run the browser tests")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [ui] tests)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def expect_api(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    return expect


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.base = server[0]
    yield page
    context.close()


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("KONTEXT_LORA_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"ui-{name}.png"))


def _get(url: str, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# ------------------------------------------------------------------------------------------------------ browser


def test_a_caption_fixed_in_the_browser_is_on_disk(page, project: Path) -> None:
    page.goto(page.base + "/datasets")
    page.get_by_role("link", name="data_examples/bw").click()
    rows = page.locator("tr.pair")
    rows.first.wait_for()
    assert rows.count() == 8
    coffee = page.locator("tr.pair[data-stem=coffee]")
    assert "64x64" not in coffee.locator(".bucket").inner_text()  # the default 512 area buckets
    assert "512x512 | 512x512" in coffee.locator(".bucket").inner_text()
    _screenshot(page, "datasets")

    coffee.locator("textarea[name=caption]").fill("make it black and white, keep the cup sharp")
    coffee.get_by_role("button", name="Save caption").click()
    page.locator("tr.pair[data-stem=coffee] .saved").wait_for()
    caption_file = project / "data_examples" / "bw" / "target" / "coffee.txt"
    assert caption_file.read_text() == "make it black and white, keep the cup sharp\n"
    page.reload()  # read back from disk, not from the form
    assert page.locator("tr.pair[data-stem=coffee] textarea").input_value() == (
        "make it black and white, keep the cup sharp"
    )


def test_a_bad_lora_rank_shows_its_error_at_the_key(page, expect_api) -> None:
    expect = expect_api
    page.goto(page.base + "/config?path=configs/examples/tiny_bw.yaml")
    rank = page.locator("#k-lora\\.rank")
    assert rank.input_value() == "16"  # from base.yaml, through `extends:`
    rank.fill("0")
    rank.dispatch_event("change")
    error = page.locator(".field[data-key='lora.rank'] .key-error")
    expect(error).to_have_text("config key `lora.rank`: must be > 0, got 0")
    rank.evaluate("element => element.scrollIntoView({block: 'center'})")
    assert page.locator(".field[data-key='lora.alpha'] .key-error").inner_text() == ""
    _screenshot(page, "config-error")
    rank.fill("8")
    rank.dispatch_event("change")
    expect(error).to_have_text("")
    page.locator("#plan-peak").wait_for(timeout=120_000)  # the planner's prediction beside the form
    assert float(page.locator("#plan-peak").inner_text().split()[0]) > 0
    assert "lora.rank=8" in page.locator("pre.overrides").first.inner_text()
    _screenshot(page, "config")


def _paused_after_step(run_dir: Path, step: int, timeout: float = 120.0) -> int:
    """Pause (SIGSTOP) the UI's training process for `run_dir` once its metrics reach `step`; returns its PID.

    The process is the UI server's child: found by the `output.dir=` on its command line."""
    wanted = f"output.dir={RUN_DIR}".encode()
    deadline = time.monotonic() + timeout
    pid = None
    while time.monotonic() < deadline:
        if pid is None:
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and wanted in (proc / "cmdline").read_bytes().split(b"\0"):
                        pid = int(proc.name)
                except OSError:
                    continue
        metrics = run_dir / "metrics.jsonl"
        if pid is not None and metrics.is_file() and f'"step": {step},'.encode() in metrics.read_bytes():
            os.kill(pid, signal.SIGSTOP)
            return pid
        time.sleep(0.005)
    raise AssertionError(f"the run in {run_dir} reached no step {step} within {timeout:.0f} s")


def test_launch_watch_stop_resume_and_download_the_tiny_run(page, project: Path, tmp_path: Path) -> None:
    page.goto(page.base + "/config?path=configs/examples/tiny_bw.yaml")
    for key, value in RUN_FIELDS.items():
        field = page.locator(f"#k-{key.replace('.', chr(92) + '.')}")
        if field.evaluate("element => element.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.get_by_role("button", name="Launch run").click()
    page.wait_for_url(re.compile(r"/run\?path=runs%2Fui_tiny$"))
    run_dir = project / RUN_DIR

    # The tiny run trains all 40 steps in about 2 s, faster than the page refreshes: the training process is
    # paused (SIGSTOP) past step 4's validation, so the page is watched and the Stop clicked while it is mid-run.
    trainer = _paused_after_step(run_dir, 5)
    try:
        # Live progress: the step counter moves and a validation grid appears, polled from the run's files.
        counter = page.locator("#step-counter")
        page.wait_for_function(STEP_AT_LEAST, arg=5, timeout=90_000)
        page.locator(".grid-step img.grid").first.wait_for(timeout=60_000)
        assert (run_dir / "validation" / "step-000004").is_dir()
        _screenshot(page, "run")
        page.get_by_role("button", name="Stop (keep checkpoint)").click()
        time.sleep(0.5)  # the SIGTERM is delivered while the process is paused, handled once it continues
    finally:
        os.kill(trainer, signal.SIGCONT)
    page.locator("#run-state", has_text="stopped").wait_for(timeout=60_000)
    kept = checkpoint.latest_checkpoint(run_dir)
    assert kept is not None
    stopped_at = checkpoint.read_state(kept, checkpoint.STATE_NAME)["step"]
    assert 5 <= stopped_at <= 10  # paused at step 5: the stop lands at the next step boundary or so
    assert int(counter.inner_text()) == stopped_at
    assert not (run_dir / "pytorch_lora_weights.safetensors").exists()

    page.get_by_role("button", name="Resume").click()
    page.locator("#run-state", has_text="done").wait_for(timeout=120_000)
    assert counter.inner_text() == "40"
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {RUN_DIR}/{kept.name} at step {stopped_at}" in log
    assert page.locator("#best-step").is_visible()  # best.json's step, marked among the grids
    best_step = int(page.locator("#best-step").inner_text().split()[1])
    assert page.locator(f".grid-step[data-step='{best_step}'] .tag.best").is_visible()

    with page.expect_download() as download_info:
        page.locator("a.download", has_text=f"{RUN_DIR}/pytorch_lora_weights.safetensors").click()
    downloaded = tmp_path / "adapter.safetensors"
    download_info.value.save_as(downloaded)
    assert downloaded.read_bytes() == (run_dir / "pytorch_lora_weights.safetensors").read_bytes()
    with safe_open(str(downloaded), framework="pt") as handle:
        assert any("lora_A" in key for key in handle.keys())
    page.evaluate("window.scrollTo(0, 0)")
    _screenshot(page, "run-done")


def test_the_sweep_summary_sorts_and_opens_its_runs(page, project: Path, sweep_run) -> None:
    assert sweep_run.wait(timeout=120) == 0, (project.parent / "sweep.log").read_text()[-3000:]
    page.goto(page.base + "/sweeps")
    page.get_by_role("link", name="runs/sweeps/ui_sweep").click()
    rows = page.locator("table.sweep tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    page.get_by_role("link", name="final_train_loss").click()
    page.wait_for_url("**sort=final_train_loss**")
    losses = [float(text) for text in page.locator("table.sweep tbody tr td:nth-child(5)").all_inner_texts()]
    assert losses == sorted(losses)
    page.get_by_role("link", name="final_train_loss ▲").click()
    page.wait_for_url("**desc=1**")
    descending = [float(t) for t in page.locator("table.sweep tbody tr td:nth-child(5)").all_inner_texts()]
    assert descending == sorted(losses, reverse=True)
    assert page.locator("img.plot").is_visible()
    _screenshot(page, "sweep")
    page.get_by_role("link", name="lr1e-4").click()
    page.locator("#run-state", has_text="done").wait_for()
    assert page.locator("#step-counter").inner_text() == "6"


# ----------------------------------------------------------------------------------------------------- refusals


def test_paths_outside_the_root_are_refused(server, project: Path) -> None:
    base, _ = server
    outside = project.parent / "outside.txt"
    outside.write_text("secret")
    (project / "link-out").symlink_to(outside)
    for path in ("../outside.txt", str(outside), "link-out", "/etc/passwd", "data_examples/../../outside.txt"):
        status, body = _get(f"{base}/files?path={urllib.parse.quote(path)}")
        assert status == 403 and "is outside the UI" in body, (path, status)
        assert "secret" not in body
    for url in ("/dataset?path=..", "/config?path=..%2Foutside.txt", "/thumb?path=..%2Foutside.txt",
                "/run?path=..", "/sweep?path=%2Ftmp"):  # fmt: skip
        assert _get(base + url)[0] == 403, url
    request = urllib.request.Request(
        f"{base}/dataset/caption", data=b"path=..&stem=coffee&caption=x", method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert outside.read_text() == "secret"


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the sockets listening on `port` (Linux /proc/net/tcp and tcp6; state 0A is LISTEN)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def _other_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks a route
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_server_listens_on_loopback_only(server) -> None:
    base, port = server
    addresses = _listening_addresses(port)
    if Path("/proc/net/tcp").is_file():
        assert addresses == ["0100007F"], addresses  # 127.0.0.1 only, no 0.0.0.0 or IPv6 socket
    other = _other_address()
    if other is not None:
        with pytest.raises(OSError):
            socket.create_connection((other, port), timeout=2).close()
    # A request naming another host (DNS rebinding) is refused even on loopback, as is a POST from another site.
    assert _get(base + "/", {"Host": f"attacker.example:{port}"})[0] == 400
    assert _get(base + "/")[0] == 200
    request = urllib.request.Request(
        f"{base}/dataset/flag", data=b"path=data_examples/bw&stem=coffee&flagged=1", method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://attacker.example"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
