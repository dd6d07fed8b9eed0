"""Gradio chat page over the engine: streaming replies, where each one ran and why, live device load.

Run with `accelserve chat [--model M]` (or `make demo` for the default model); `--model` repeated loads each model
and the page switches between them (base and fine-tuned, demos/lifecycle.py). Binds 127.0.0.1 by default;
like the API server, it refuses a non-loopback bind without a login (`--auth USER:PASSWORD` or the
ACCELSERVE_CHAT_AUTH variable) unless told `--insecure-no-auth`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from plugin.engine.engine import Engine
from plugin.engine.explain import placement_text
from plugin.engine.scheduler import POLICIES

log = logging.getLogger(__name__)

SEPARATOR = "\n\n---\n"


def placement_markdown(placement: Any, metrics: Any | None) -> str:
    return placement_text(placement, metrics, markdown=True)


def inventory_markdown(engine: Engine) -> str:
    rows = [
        "| device | name | executes as | healthy | loaded (provider) | active | waiting |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in engine.status():
        loaded = ", ".join(f"{x['backend']} {x['precision']} ({x['provider']})" for x in s["loaded"]) or "-"
        health = "yes" if s["healthy"] else f"no: {s['unhealthy_reason']}"
        sim = "emulated (on the CPU)" if s["emulated"] else "simulated (on the CPU)" if s["simulated"] else "real"
        rows.append(
            f"| {s['device_id']} | {s['name']} | {sim} | {health} | {loaded} | {s['active']} | {s['waiting']} |"
        )
    return "\n".join(rows)


def model_label(engine: Engine) -> str:
    """How the page names a loaded model: its reference, or a folder's name (base / fine-tuned side by side)."""
    ref = str(engine.model.ref)
    return Path(ref).name if engine.model.source == "folder" else ref


def engines_by_label(engines: Engine | Sequence[Engine]) -> dict[str, Engine]:
    engines = [engines] if isinstance(engines, Engine) else list(engines)
    if not engines:
        raise ValueError("the chat page needs at least one loaded model")
    out: dict[str, Engine] = {}
    for engine in engines:
        label = model_label(engine)
        out[label if label not in out else f"{label} ({len(out) + 1})"] = engine
    return out


class ChatSession:
    """The callbacks of one page, bound to the engines of the models it serves (one per model). Tracks each
    browser session's running request and the engine that runs it."""

    def __init__(self, engines: Engine | Sequence[Engine]) -> None:
        self.engines = engines_by_label(engines)
        self.engine = next(iter(self.engines.values()))  # the first model: the page opens on it
        self._running: dict[str, tuple[Engine, str]] = {}
        self._lock = threading.Lock()

    def engine_for(self, label: str | None) -> Engine:
        if label is None:
            return self.engine
        if label not in self.engines:
            raise ValueError(f"model {label!r} is not loaded on this page; choose one of {', '.join(self.engines)}")
        return self.engines[label]

    def respond(
        self,
        message: str,
        history: list[dict[str, Any]],
        clean_history: list[dict[str, str]],
        policy: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        model: str | None = None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, str]], str]]:
        """Stream a reply into the chatbot; `clean_history` is what the model sees (no placement lines).
        `model` is the label of the loaded model that answers (None: the first)."""
        session = request.session_hash if request is not None else "local"
        message = (message or "").strip()
        if not message:
            yield history, clean_history, ""
            return
        clean_history = [*clean_history, {"role": "user", "content": message}]
        history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": "…"}]
        yield history, clean_history, ""
        text = ""
        try:
            engine = self.engine_for(model)
            stream = engine.chat(
                clean_history,
                stream=True,
                policy=policy,
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
            )
            for chunk in stream:
                with self._lock:
                    self._running[session] = (engine, chunk.request_id)
                text += chunk.text
                footer = ""
                if chunk.finish_reason is not None:
                    if chunk.finish_reason == "cancelled":
                        text += " ⏹ *(stopped)*"
                    elif chunk.finish_reason == "error":
                        text += f"\n\n⚠️ {chunk.error}"
                    footer = SEPARATOR + placement_markdown(chunk.placement, chunk.metrics)
                    if len(self.engines) > 1:
                        footer += f"  \nmodel: **{model or model_label(engine)}**"
                history[-1] = {"role": "assistant", "content": (text or "…") + footer}
                yield history, clean_history, ""
            clean_history = [*clean_history, {"role": "assistant", "content": text}]
        except Exception as e:  # shown on the page, never as a traceback; the page stays usable
            log.warning("chat request failed: %s", e)
            history[-1] = {"role": "assistant", "content": f"⚠️ **{type(e).__name__}**: {e}"}
            clean_history = clean_history[:-1]
        finally:
            with self._lock:
                self._running.pop(session, None)
        yield history, clean_history, ""

    def stop(self, request: gr.Request | None = None) -> None:
        session = request.session_hash if request is not None else "local"
        with self._lock:
            running = self._running.get(session)
        if running:
            engine, request_id = running
            engine.cancel(request_id)

    def inventory(self) -> str:
        """The device table; one per model when the page serves several."""
        if len(self.engines) == 1:
            return inventory_markdown(self.engine)
        return "\n\n".join(f"**{label}**\n\n{inventory_markdown(e)}" for label, e in self.engines.items())


def build_app(engines: Engine | Sequence[Engine]) -> gr.Blocks:
    """The page over one engine, or several (one per model: e.g. base and fine-tuned) with a model switch."""
    session = ChatSession(engines)
    engine = session.engine
    labels = list(session.engines)
    if len(labels) == 1:
        title = f"accelserve · {engine.model.ref} ({engine.model.profile.size_label} params)"
    else:
        title = "accelserve · " + " / ".join(labels)
    with gr.Blocks(title="accelserve chat") as app:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot")
                clean_history = gr.State([])
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask something…", show_label=False, scale=5, elem_id="prompt")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                clear = gr.Button("New chat", size="sm")
            with gr.Column(scale=2):
                # The switch writes a per-browser State, so the named /chat endpoint keeps its parameters;
                # the next reply comes from the chosen model, with the conversation so far.
                model = gr.State(labels[0])
                switch = gr.Dropdown(
                    labels, value=labels[0], label="Model", visible=len(labels) > 1, elem_id="model-switch"
                )
                switch.change(lambda label: label, switch, model, api_visibility="private")
                policy = gr.Radio(
                    POLICIES, value=engine.policy if engine.policy in POLICIES else "auto", label="Policy"
                )
                max_new = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                inventory = gr.Markdown(session.inventory(), elem_id="inventory")
                timer = gr.Timer(2.0)
        inputs = [box, chatbot, clean_history, policy, max_new, temperature, top_p, model]
        outputs = [chatbot, clean_history, box]
        # Named endpoints, so gradio_client users can call /chat, /stop, /new_chat and /inventory; the Enter
        # key runs the same function as the Send button, so its copy is hidden from the API.
        refresh = {"fn": lambda: session.inventory(), "inputs": None, "outputs": inventory}
        send.click(session.respond, inputs, outputs, api_name="chat", concurrency_limit=None).then(
            **refresh, api_visibility="private"
        )
        box.submit(session.respond, inputs, outputs, concurrency_limit=None, api_visibility="private").then(
            **refresh, api_visibility="private"
        )
        stop.click(session.stop, None, None, queue=False, api_name="stop")
        clear.click(lambda: ([], []), None, [chatbot, clean_history], api_name="new_chat")
        timer.tick(**refresh, api_name="inventory")
    return app


AUTH_ENV = "ACCELSERVE_CHAT_AUTH"


def chat_auth(host: str, auth: str | None, allow_insecure: bool) -> tuple[str, str] | None:
    """The page's login as Gradio takes it; refuses to expose the page beyond this machine without one."""
    from plugin.serve.server import is_loopback

    auth = auth or os.environ.get(AUTH_ENV) or None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"the chat login must be USER:PASSWORD (from --auth or {AUTH_ENV}), both non-empty")
        return user, password
    if is_loopback(host) or allow_insecure:
        if not is_loopback(host):
            log.warning("!!! THE CHAT PAGE IS OPEN ON %s WITHOUT A LOGIN: anyone who can reach it can use it !!!", host)
        return None
    raise ValueError(
        f"refusing to serve the chat page on {host!r} without a login: anyone who can reach this address could use "
        f"it. Pass --auth USER:PASSWORD (or set {AUTH_ENV}), bind 127.0.0.1, or pass --insecure-no-auth"
    )


def launch(
    model_ref: str | Sequence[str] = "default",
    host: str = "127.0.0.1",
    port: int = 7860,
    policy: str = "auto",
    share: bool = False,
    auth: str | None = None,
    allow_insecure: bool = False,
) -> None:
    """Serve the page over one model or several (`model_ref` a list: each loaded, switchable on the page)."""
    login = chat_auth("0.0.0.0" if share else host, auth, allow_insecure)  # a share link is public
    refs = [model_ref] if isinstance(model_ref, str) else list(dict.fromkeys(model_ref))
    engines: list[Engine] = []
    try:
        for ref in refs:
            engine = Engine.from_pretrained(ref, policy=policy)
            engines.append(engine)
            placement = engine.preload()
            log.info("ready: %s on %s via %s (%s)", ref, placement.device_id, placement.backend, placement.provider)
        app = build_app(engines)
        app.queue(default_concurrency_limit=None).launch(server_name=host, server_port=port, share=share, auth=login)
    finally:
        for engine in engines:
            engine.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch()
