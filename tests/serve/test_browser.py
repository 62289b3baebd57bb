"""`covey serve` as a person uses it: the real server process, driven by headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from covey.model.generate import GenerationSettings
from covey.serve.generate import BASE, TUNED, ServeSession

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "Name three birds."
# One beam streams; sampling at temperature 1 is, unlike greedy decoding on this random tiny
# model, not just whitespace; the seed makes it repeatable.
SETTINGS = GenerationSettings(sample=True, temperature=1.0, top_p=1.0, top_k=0, num_beams=1,
                              max_new_tokens=16, seed=1)  # fmt: skip
# Both panes settled: an answer in each, and no event still running on either pane.
ANSWERED = """() => {
  const done = id => {
    const bots = [...document.querySelectorAll(`#${id} [data-testid="bot"]`)];
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : "";
    const tracker = document.querySelector(`#${id} [data-testid="status-tracker"]`);
    return text !== "" && text !== "…" && (!tracker || tracker.classList.contains("hide"));
  };
  return done("base-chat") && done("tuned-chat");
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_server(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"covey serve exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"covey serve did not answer on {url} within {timeout:.0f} s:\n{log.read_text()}")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.browser
def test_a_prompt_gets_an_answer_in_both_panes(
    tiny_run: Path, session: ServeSession, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    from PIL import Image
    from playwright.sync_api import sync_playwright

    expected = list(session.stream(PROMPT, "", SETTINGS, (BASE, TUNED)))[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "COVEY_SERVE_AUTH"}
    env |= {"GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "covey", "serve", "--run", str(tiny_run), "--port", str(port),
               "--examples", "4"]  # fmt: skip
    started = time.monotonic()
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    try:
        wait_for_server(url, server, log, timeout=300)
        ready = time.monotonic()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                page = browser.new_page()
                page.goto(url)
                page.wait_for_selector("#instruction textarea", timeout=60_000)
                described = page.locator("#generation-settings")
                assert "greedy preset: greedy decoding (deterministic)" in described.inner_text()
                page.locator("#sample input[type=checkbox]").check()
                controls = {
                    "temperature": SETTINGS.temperature,
                    "top-p": SETTINGS.top_p,
                    "top-k": SETTINGS.top_k,
                    "beams": SETTINGS.num_beams,
                    "max-new-tokens": SETTINGS.max_new_tokens,
                }
                for control, value in controls.items():
                    box = page.locator(f"#{control} input[type=number]")
                    box.fill(str(value))
                    box.press("Enter")
                seed = page.locator("#seed input")
                seed.fill(str(SETTINGS.seed))
                seed.press("Enter")
                page.wait_for_function(
                    "() => document.querySelector('#generation-settings').innerText"
                    ".includes('custom settings: sampling at temperature 1')",
                    timeout=30_000,
                )
                page.locator("#instruction textarea").fill(PROMPT)
                page.locator("#send").click()
                page.wait_for_function(ANSWERED, timeout=240_000, polling=250)

                answers = []
                for pane in ("base-chat", "tuned-chat"):
                    users = page.locator(f"#{pane} [data-testid=user]").all_inner_texts()
                    bots = page.locator(f"#{pane} [data-testid=bot]").all_inner_texts()
                    assert [u.strip() for u in users] == [PROMPT]
                    assert len(bots) == 1 and bots[0].strip() and "empty answer" not in bots[0]
                    answers.append(bots[0].strip())
                # Each pane shows exactly what the session answers for it (base left, tuned
                # right); the browser's innerText turns a carriage return into a line feed.
                shown = [a.replace("\r\n", "\n").replace("\r", "\n") for a in expected]
                assert answers == shown, f"panes show {answers!r}, the session answers {shown!r}"
                assert expected[0] != expected[1]  # so swapped panes would fail the line above
                # the question stays in view with its answers
                assert page.locator("#instruction textarea").input_value() == PROMPT
                screenshot = tmp_path / "serve_screenshot.png"
                page.screenshot(path=str(screenshot), full_page=True)

                page.get_by_role("tab", name="Run").click()
                page.wait_for_selector("#contributions", state="visible", timeout=30_000)
                assert "accepted" in page.locator("#contributions").inner_text()
                page.screenshot(path=str(tmp_path / "serve_run_tab.png"), full_page=True)
            finally:
                browser.close()
        answered = time.monotonic()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    width, height = png_size(screenshot)
    assert width >= 1000 and height >= 800 and screenshot.stat().st_size > 20_000
    with Image.open(screenshot) as image:
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 100  # not blank
    print(
        f"\nbrowser test: server ready in {ready - started:.1f} s, answered and checked in "
        f"{answered - ready:.1f} s; screenshot {screenshot}"
    )
