"""The web console of ``sandboxctl up`` in a real browser (Debian's chromium, headless, through
chromium-driver and selenium): the page follows the log without a reload as the CLI creates and
stops a sandbox, its Start button acts as the signed-in user, a sandbox's timeline grows live;
a reader sees no buttons and a reader's forged POST is refused by the state machine; text from
the log is shown as text, never run; bad input gets a structured answer.

The browser blocks while it waits, so it runs in a thread; ``up`` runs in its own process, as a
user runs it. With SANDBOXCTL_CONSOLE_SCREENSHOT set to a path, the main page is saved there
(docs/console.png is made so)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from sandboxctl.auth import AuthStore
from sandboxctl.runtime.embedded import free_port
from tests.conftest import ROOT, cli_process
from tests.uprun import Up, up_env

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0  # seconds the page has to show what the log says
HOSTILE = '<img src=x onerror="window.pwned=1">'


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,720"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


async def in_browser(step: Callable[[], Any]) -> Any:
    """A blocking browser step, run off the event loop (``up``'s output is read there)."""
    return await asyncio.to_thread(step)


async def console_up(tmp_path: Path, podman_url: str) -> tuple[Up, str]:
    port = free_port()
    up = await Up(up_env(tmp_path, port, podman_url=podman_url), port).start()
    await up.up()
    said = await up.line(r"^console at http://")
    return up, said.removeprefix("console at ").strip()


def password(up: Up, user: str) -> str:
    return AuthStore(up.data / "auth").credentials(user).password


def sign_in(driver: WebDriver, url: str, user: str, secret: str) -> None:
    driver.get(url)
    driver.find_element(By.ID, "login-user").send_keys(user)
    driver.find_element(By.ID, "login-password").send_keys(secret)
    driver.find_element(By.ID, "login-submit").click()
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.ID, "counts"))


def row(driver: WebDriver, name: str) -> Any:
    found = driver.find_elements(By.CSS_SELECTOR, f'#sandboxes tbody tr[data-name="{name}"]')
    return found[0] if found else None


def phase_of(driver: WebDriver, name: str) -> str:
    """The phase the row shows (read in the page: a row is redrawn whenever its sandbox moves)."""
    script = (
        'const tr = document.querySelector(`#sandboxes tbody tr[data-name="${CSS.escape(arguments[0])}"]`);'
        "return tr ? tr.querySelector('td.phase').textContent : '';"
    )
    return str(driver.execute_script(script, name))


def click(driver: WebDriver, name: str, verb: str) -> None:
    """Click the row's button for ``verb`` (again, if the row was redrawn under the click)."""
    WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: row(d, name).find_element(By.CSS_SELECTOR, f"button.act-{verb}").click() or True
    )


def until_phase(driver: WebDriver, name: str, phase: str) -> None:
    WebDriverWait(driver, WAIT).until(
        lambda d: phase_of(d, name) == phase, f"{name} not shown {phase}: {phase_of(driver, name)!r}"
    )


async def test_the_page_follows_the_log_without_a_reload_and_start_acts_as_the_user(
    tmp_path: Path, podman_url: str, image: str, sandboxes: list[str], browser: WebDriver
) -> None:
    up, url = await console_up(tmp_path, podman_url)
    name, other = f"con-{up.port}", f"con-{up.port}-b"
    sandboxes += [name, other]
    try:
        code, _, err = await cli_process(up.env, "create", name, "--image", image, "--label", "team=red")
        assert code == 0, err
        await in_browser(lambda: sign_in(browser, url, "local-op", password(up, "local-op")))
        await in_browser(lambda: until_phase(browser, name, "Ready"))
        marker = browser.execute_script("window.testMarker = 'same page'; return window.consoleLoadedAt")
        assert marker

        # The CLI creates another: it comes into the open page's table, with no reload.
        assert row(browser, other) is None
        code, _, err = await cli_process(up.env, "create", other, "--image", image, "--label", "team=blue")
        assert code == 0, err
        await in_browser(lambda: until_phase(browser, other, "Ready"))
        assert browser.execute_script("return window.testMarker") == "same page"

        # The CLI stops it: the row changes on the page that is open, with no reload.
        code, _, err = await cli_process(up.env, "stop", name)
        assert code == 0, err
        await in_browser(lambda: until_phase(browser, name, "Stopped"))
        assert browser.execute_script("return window.testMarker") == "same page"
        assert browser.execute_script("return window.consoleLoadedAt") == marker
        counts = browser.find_element(By.ID, "count-Stopped").text
        assert counts.split()[0] == "1", counts

        # Start, clicked as the signed-in admin: Ready, still without a reload.
        await in_browser(lambda: click(browser, name, "start"))
        await in_browser(lambda: until_phase(browser, name, "Ready"))
        assert browser.execute_script("return window.testMarker") == "same page"
        notice = browser.find_element(By.ID, "notice").text
        assert re.search(r"start .*: accepted at log seq \d+", notice), notice
        code, out, err = await cli_process(up.env, "history", name, "-o", "json")
        assert code == 0, err
        starts = [h for h in json.loads(out) if h["type"] == "sandboxctl.sandbox.start_requested.v1"]
        assert starts and starts[-1]["actor"] == "local-op", out  # the command was the user's own

        # The filters: by label, then by phase, each a table of its own that follows the log.
        await in_browser(lambda: browser.get(f"{url}?label=team%3Dblue"))
        await in_browser(lambda: until_phase(browser, other, "Ready"))
        assert row(browser, name) is None
        await in_browser(lambda: browser.get(f"{url}?phase=Stopped"))
        WebDriverWait(browser, WAIT).until(lambda d: "live at log seq" in d.find_element(By.ID, "live").text)
        assert row(browser, name) is None and row(browser, other) is None
        code, _, err = await cli_process(up.env, "stop", other)
        assert code == 0, err
        await in_browser(lambda: until_phase(browser, other, "Stopped"))  # it came into the filtered table

        # The main page, with what the test made, for docs/console.png.
        await in_browser(lambda: browser.get(url))
        await in_browser(lambda: until_phase(browser, name, "Ready"))
        shot = tmp_path / "console.png"
        assert browser.save_screenshot(str(shot))
        if os.environ.get("SANDBOXCTL_CONSOLE_SCREENSHOT"):
            shutil.copy(shot, os.environ["SANDBOXCTL_CONSOLE_SCREENSHOT"])

        # One sandbox's page: its history as a timeline that grows as the log does.
        await in_browser(lambda: browser.get(f"{url}sandboxes/{name}"))
        await in_browser(lambda: until_phase(browser, name, "Ready"))
        steps = browser.find_elements(By.CSS_SELECTOR, "#timeline li")
        assert any("sandbox.stop_requested" in s.text and "local-op" in s.text for s in steps), [s.text for s in steps]
        marker = browser.execute_script("return window.consoleLoadedAt")
        reason = "<script>window.pwned=1</script> done for today"
        code, _, err = await cli_process(up.env, "stop", name, "--reason", reason)
        assert code == 0, err
        await in_browser(lambda: until_phase(browser, name, "Stopped"))
        WebDriverWait(browser, WAIT).until(
            lambda d: any(reason in s.text for s in d.find_elements(By.CSS_SELECTOR, "#timeline li .why"))
        )
        assert browser.execute_script("return window.consoleLoadedAt") == marker
        assert browser.execute_script("return window.pwned") is None  # shown, never run
        assert browser.find_element(By.ID, "logs").text  # its logs, or why there are none

        # The event stream, with events --follow's filters.
        await in_browser(lambda: browser.get(f"{url}events?sandbox={name}&type=stopped"))
        WebDriverWait(browser, WAIT).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#events tbody tr")) >= 2)
        shown = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")]
        assert all(name in r and "sandbox.stopped" in r for r in shown), shown
        assert await up.stop() == 0, up.text
        assert "Traceback" not in up.text, up.text
    finally:
        await up.kill()


async def test_a_reader_sees_no_buttons_its_forged_post_is_refused_and_log_text_stays_text(
    tmp_path: Path, podman_url: str, image: str, sandboxes: list[str], browser: WebDriver
) -> None:
    up, url = await console_up(tmp_path, podman_url)
    name = f"con-{up.port}"
    sandboxes.append(name)
    try:
        code, _, err = await cli_process(up.env, "user", "add", "reader", "--role", "sandbox:read")
        assert code == 0, err
        code, _, err = await cli_process(up.env, "create", name, "--image", image, "--label", f"note={HOSTILE}")
        assert code == 0, err

        await in_browser(lambda: sign_in(browser, url, "reader", password(up, "reader")))
        await in_browser(lambda: until_phase(browser, name, "Ready"))
        assert browser.find_elements(By.CSS_SELECTOR, "#sandboxes button") == []  # a reader has no buttons
        labels = browser.execute_script(
            "return document.querySelector(`#sandboxes tr[data-name='${arguments[0]}'] td.labels`).textContent", name
        )
        assert labels == f"note={HOSTILE}", labels  # as text
        assert browser.find_elements(By.CSS_SELECTOR, "#sandboxes img") == []
        assert browser.execute_script("return window.pwned") is None
        await in_browser(lambda: browser.get(f"{url}sandboxes/{name}"))
        assert HOSTILE in browser.find_element(By.CSS_SELECTOR, "dl.details").text
        assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
        assert browser.execute_script("return window.pwned") is None

        async with httpx.AsyncClient(base_url=url, headers={"Origin": url.rstrip("/")}) as reader:
            answer = await reader.post("/login", data={"user": "reader", "password": "wrong"})
            assert answer.status_code == 401 and "did not accept" in answer.text
            answer = await reader.post("/login", data={"user": "reader", "password": password(up, "reader")})
            assert answer.status_code == 303
            token = re.search(r'data-csrf="([^"]+)"', (await reader.get("/")).text)
            assert token is not None
            # Forged: the token is right, the role is not. The state machine refuses it.
            answer = await reader.post(f"/sandboxes/{name}/stop", headers={"X-CSRF-Token": token.group(1)})
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "permission_denied", answer.text
            assert "may not stop" in answer.json()["error"]["message"], answer.text
            # No token, or another site's page: refused before anything is sent.
            answer = await reader.post(f"/sandboxes/{name}/stop")
            assert answer.status_code == 403 and "token" in answer.text
            answer = await reader.post(
                f"/sandboxes/{name}/stop",
                headers={"X-CSRF-Token": token.group(1), "Origin": "http://elsewhere.example"},
            )
            assert answer.status_code == 403
            # Dead letters are an admin's.
            answer = await reader.get("/deadletters")
            assert answer.status_code == 403 and "admin" in answer.text
            # Bad input: a structured answer.
            answer = await reader.get("/sandboxes/no-such-sandbox")
            assert answer.status_code == 404 and "<code>not_found</code>" in answer.text
            answer = await reader.get("/stream/sandboxes", params={"phase": "Bogus"})
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_argument"
            answer = await reader.get("/stream/events", params={"since": "yesterday-ish"})
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_argument"
            # Signed out: the session is gone.
            answer = await reader.post("/logout", data={"csrf": token.group(1)})
            assert answer.status_code == 303
            answer = await reader.get("/stream/sandboxes")
            assert answer.status_code == 401
        code, out, err = await cli_process(up.env, "get", name, "-o", "json")
        assert code == 0 and json.loads(out)["phase"] == "Ready", out + err  # the forged stop did nothing
        code, out, err = await cli_process(up.env, "audit", "denied", "-o", "json")
        assert code == 0 and any(d["user"] == "reader" and d["action"] == "stop" for d in json.loads(out)), out

        async with httpx.AsyncClient(base_url=url, headers={"Origin": url.rstrip("/")}) as admin:
            await admin.post("/login", data={"user": "local-op", "password": password(up, "local-op")})
            token = re.search(r'data-csrf="([^"]+)"', (await admin.get("/")).text)
            assert token is not None
            answer = await admin.post("/sandboxes/no-such-sandbox/stop", headers={"X-CSRF-Token": token.group(1)})
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found", answer.text
            assert (await admin.get("/deadletters")).status_code == 200
        assert await up.stop() == 0, up.text
    finally:
        await up.kill()


async def test_serve_only_console_serves_it_on_its_own_user_and_answers_health(
    tmp_path: Path, podman_url: str, image: str, sandboxes: list[str]
) -> None:
    """``serve --only console`` beside an ``up``: the console alone, on the NATS user ``up`` made
    for it, on the address --console names, in the process's health answer."""
    up, _ = await console_up(tmp_path / "up", podman_url)
    serve = None
    try:
        port = free_port()
        env = {**up.env, "SANDBOXCTL_RUN_DIR": str(tmp_path / "serve-run")}
        serve = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandboxctl.cli", "serve", "--only", "console", "--console", f"127.0.0.1:{port}",
            env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert serve.stdout is not None
        said = b""
        async with asyncio.timeout(60):
            while b"console at" not in said:
                line = await serve.stdout.readline()
                assert line, said
                said += line
        assert f"console at http://127.0.0.1:{port}/".encode() in said, said
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as web:
            answer = await web.get("/")
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
            answer = await web.get("/login")
            assert answer.status_code == 200 and 'id="login-user"' in answer.text
        code, out, err = await cli_process(up.env, "status", "-o", "json")
        assert code == 0, err
        assert any(r["component"] == "console" and r["healthy"] for r in json.loads(out)), out
        serve.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(serve.communicate(), 30)
        assert serve.returncode == 0 and b"Traceback" not in said + rest, (said + rest).decode()
        assert await up.stop() == 0, up.text
    finally:
        if serve is not None and serve.returncode is None:
            serve.kill()
            await serve.wait()
        await up.kill()
