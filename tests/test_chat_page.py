"""The Gradio chat page in a real headless Chromium: send, stream, placement line, Stop, policy switch.

The page runs over an engine with fake devices (simulated GPU + NPU, and the CPU) whose fake backends
stream one word every few tens of milliseconds, so a reply can be watched growing and stopped midway.
Needs Debian's chromium (`make test` installs it when missing); skips, saying why, where it is absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.engine.costmodel import CostModel
from plugin.engine.engine import Engine
from plugin.models.resolve import resolve_model

from fakes import FakeBackend, device

CHROMIUM = os.environ.get("ACCELSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WORD_DELAY_S = 0.05

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium; CI does this) "
        "or point ACCELSERVE_CHROMIUM at a Chromium binary",
        allow_module_level=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """The running page, its engine and fake backends, and a browser tab."""

    def __init__(self, url: str, engine: Engine, backends: dict[str, FakeBackend], tab) -> None:
        self.url, self.engine, self.backends, self.tab = url, engine, backends, tab

    def send(self, text: str) -> None:
        box = self.tab.locator("#prompt textarea")
        box.fill(text)
        self.tab.locator("#send").click()

    def last_reply(self):
        return self.tab.locator("#chatbot .bot-row").last

    def new_chat(self) -> None:
        self.tab.get_by_role("button", name="New chat").click()
        self.tab.wait_for_function("() => document.querySelectorAll('#chatbot .bot-row').length === 0")

    def active(self) -> int:
        return sum(d["active"] for d in self.engine.status())


@pytest.fixture(scope="module")
def page(tiny_llama, tmp_path_factory) -> Iterator[Page]:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from demos.chat import build_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELSERVE_HOME", str(tmp_path_factory.mktemp("home")))
        model = resolve_model(tiny_llama)
        backends = {k: FakeBackend(k, token_delay_s=WORD_DELAY_S) for k in ("cpu", "gpu", "npu")}
        engine = Engine(
            model,
            devices=[device(k) for k in ("cpu", "gpu", "npu")],
            backend_factory=lambda resolved, placement, dev: backends[dev.kind],
            cost_model=CostModel(path=None),
        )
        port = free_port()
        app = build_app(engine)
        app.queue(default_concurrency_limit=None).launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False
        )
        try:
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
                    tab.set_default_timeout(30_000)  # bounds every wait: no browser step can hang the suite
                    url = f"http://127.0.0.1:{port}/"
                    tab.goto(url, wait_until="domcontentloaded")
                    tab.locator("#prompt textarea").wait_for()
                    yield Page(url, engine, backends, tab)
                finally:
                    browser.close()
        finally:
            app.close()
            engine.close()


def test_reply_streams_and_shows_its_placement(page, tmp_path):
    page.new_chat()
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    page.send(words)
    reply = page.last_reply()
    # watch the reply grow: some snapshot must hold part of the text without the placement footer yet
    partial_seen = False
    deadline = time.time() + 30
    while time.time() < deadline:
        text = reply.inner_text() if reply.count() else ""
        if "echo: one" in text and "sixteen" not in text:
            partial_seen = True
        if "sixteen" in text and "onnxruntime-genai" in text:
            break
        time.sleep(0.03)
    assert partial_seen, "the reply appeared all at once: it was not streamed"
    text = reply.inner_text()
    assert f"echo: {words}" in text
    # the placement line: device, backend, provider and that the NPU is simulated
    assert "NPU" in text and "simulated" in text
    assert "onnxruntime-genai" in text and "CPUExecutionProvider" in text
    assert "18 tokens" in text  # "echo:" and sixteen words, plus the EOS token every backend counts
    # the device table shows the NPU backend loaded
    page.tab.wait_for_function("() => document.querySelector('#inventory').innerText.includes('onnxruntime-genai')")
    page.tab.screenshot(path=str(tmp_path / "chat-page.png"), full_page=True)
    assert (tmp_path / "chat-page.png").stat().st_size > 10_000


def test_stop_cancels_a_long_reply_in_the_engine(page, tmp_path):
    page.new_chat()
    npu = page.backends["npu"]
    npu.words = 400  # 400 words at 50 ms each: 20 s if nothing stops it
    try:
        served_before = len(npu.served)
        page.send("tell me a long story")
        reply = page.last_reply()
        page.tab.wait_for_function(
            "() => { const r = [...document.querySelectorAll('#chatbot .bot-row')].pop();"
            " return r && r.innerText.split('story').length > 3; }"
        )
        t_stop = time.time()
        page.tab.locator("#stop").click()
        page.tab.get_by_text("(stopped)").wait_for(timeout=10_000)
        assert time.time() - t_stop < 5
        request_id = npu.served[served_before]
        assert request_id in npu.cancelled, "the page said stopped, but the backend never saw the cancel"
        text = reply.inner_text()
        assert 3 <= text.count("story") < 390 // 5  # stopped well before the end
        deadline = time.time() + 5
        while page.active() and time.time() < deadline:
            time.sleep(0.05)
        assert page.active() == 0, "the slot of the stopped request was not freed"
        page.tab.screenshot(path=str(tmp_path / "stopped.png"), full_page=True)
    finally:
        npu.words = None
    # the page stays usable: the next message gets a full reply
    page.send("after stop")
    page.last_reply().get_by_text("echo: after stop").wait_for()


def test_policy_switch_moves_the_next_reply_to_the_gpu(page, tmp_path):
    page.new_chat()
    gpu_before = len(page.backends["gpu"].served)
    page.tab.get_by_label("gpu", exact=True).check()
    page.send("which device")
    reply = page.last_reply()
    page.tab.wait_for_function(
        "() => { const r = [...document.querySelectorAll('#chatbot .bot-row')].pop();"
        " return r && r.innerText.includes('tokens'); }"
    )
    text = reply.inner_text()
    assert "echo: which device" in text
    assert "GPU" in text and "simulated" in text and "pinned to the GPU" in text
    assert "NPU (simulated" not in text
    assert len(page.backends["gpu"].served) == gpu_before + 1
    page.tab.screenshot(path=str(tmp_path / "gpu.png"), full_page=True)
    page.tab.get_by_label("auto", exact=True).check()
