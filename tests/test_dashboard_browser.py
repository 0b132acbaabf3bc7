"""The operator dashboard in a real browser (Debian's headless Chromium, driven by selenium)
against a real three-process swarm: a gateway node (bootstrap, store, orchestrator) and two
workers. The page's counts and tables must match `swarmd status --json`; a SIGKILLed worker
turns grey; a wrong key shows the gateway's refusal. A screenshot is saved by every run
(SWARMD_SCREENSHOT=path chooses where; the README's image is made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.store_models import write_model

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _browser_or_reason() -> str | None:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    return None


@pytest.fixture
def browser():
    reason = _browser_or_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs them: a missing browser there is a broken .ci/run
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="swarmd-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _until(fn, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # the page may be between two renders
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def _admin_key(daemon) -> str:
    def find() -> str | None:
        for line in daemon.lines:
            if "first admin API key (shown once" in line:
                return line.rsplit(" ", 1)[-1].strip()
        return None

    return _until(find, "the gateway's first admin key", 30)


def _post(url: str, doc: dict, key: str) -> dict:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"x-api-key": key, "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_dashboard_shows_the_swarm_and_greys_a_dead_worker(daemons, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    g_dir = tmp_path / "g"
    g = daemons("--role", "bootstrap,store,orchestrator,gateway", "--http", "127.0.0.1:0",
                "--data-dir", str(g_dir))
    ready = g.wait_event("ready")
    boot, http = f"127.0.0.1:{ready['ports']['dht']}", ready["ports"]["http"]
    workers = [daemons("--role", "worker", "--bootstrap", boot, "--data-dir", str(tmp_path / f"w{i}"))
               for i in (1, 2)]
    worker_keys = [w.wait_event("ready")["public_key"] for w in workers]
    admin = _admin_key(g)
    model = write_model(tmp_path / "m.onnx", seed=3)
    r = run_cli("model", "push", str(model), "--name", "lin", "--version", "1", "--data-dir", str(g_dir))
    assert r.returncode == 0, r.stderr
    reader = _post(f"http://127.0.0.1:{http}/api/v1/keys", {"name": "viewer", "permissions": ["models:read"]},
                   admin)["key"]

    page = f"http://127.0.0.1:{http}/dashboard"
    browser.get(page)

    def by(testid: str):
        return browser.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    # a wrong key: the gateway's refusal is shown and no data appears
    by("api-key").send_keys("swd_wrong_key")
    by("connect").click()
    err = _until(lambda: by("error").text if by("error").is_displayed() else None, "the wrong-key error", 20)
    assert "ERR_UNAUTHORIZED" in err and "refused" in err
    assert not browser.find_element(By.ID, "main").is_displayed()

    # the right key: tables fill within a few feed rounds
    by("api-key").clear()
    by("api-key").send_keys(reader)
    by("connect").click()
    _until(lambda: by("workers-count").text == "2", "two workers on the page")
    _until(lambda: "lin" in by("models-table").text, "the pushed model in the models table")

    def rows(testid: str, attr: str) -> dict[str, str]:
        """{row's attr: row's class} read in one go: the page re-renders every second."""
        return browser.execute_script(
            "const out = {};"
            f"for (const tr of document.querySelectorAll('[data-testid=\"{testid}\"] tbody tr'))"
            f"  out[tr.dataset.{attr}] = tr.className;"
            "return out;")

    r = run_cli("status", "--json", "--data-dir", str(g_dir))
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    online = [w for w in status["workers"] if w.get("state") == "ONLINE"]
    assert by("workers-count").text == str(len(online)) == "2"
    nodes = rows("nodes-table", "key")
    assert {status["public_key"], *worker_keys} <= set(nodes)
    assert set(nodes.values()) == {"up"}
    assert sorted(rows("models-table", "name")) == sorted(m["name"] for m in status["models"])
    assert browser.execute_script("return sessionStorage.getItem('swarmd.dashboard.key')") == reader
    assert reader not in browser.current_url

    # a worker killed with SIGKILL turns grey (its row class "down") while the other stays up
    workers[1].kill()
    _until(lambda: rows("nodes-table", "key").get(worker_keys[1]) == "down",
           "the killed worker's row to turn grey", 30)
    assert rows("nodes-table", "key")[worker_keys[0]] == "up"
    _until(lambda: by("workers-count").text == "1", "one worker left up")

    shot = Path(os.environ.get("SWARMD_SCREENSHOT", tmp_path / "dashboard.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
