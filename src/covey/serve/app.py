"""The Gradio app: the base model and the fine-tuned adapter answer the same prompt side by side.

Tab "Compare": two chat panes fed by one resident model in one batched generation (the base
pane's row runs with the adapter off), both streaming as tokens come; the training prompt
template applied to every message; decoding presets (greedy, Shepherd's) with their controls,
the one in use named; and examples from the run's held-out test set. Each message is answered
on its own, as in training: the panes keep the history for reading, not as conversation memory,
and the instruction stays in its box.

Tab "Run": held-out loss per round (and ROUGE-L when the rounds score answers), each client's
contribution per round (samples, training loss, rejections), and the FLock rewards and slashes
when the rounds record them.

Safe defaults: loopback only, no public share link unless asked, and optional basic auth whose
credentials come from the environment (`COVEY_SERVE_AUTH=user:password`), never a flag, so they
stay out of shell history and `ps`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from covey.config import RunConfig
from covey.envvars import SERVE_AUTH_ENV
from covey.errors import ConfigError, CoveyError
from covey.flock.report import ROUND_COLUMNS, round_rows
from covey.model.generate import PRESETS, GenerationSettings
from covey.serve.generate import BASE, TUNED, ServeSession

if TYPE_CHECKING:
    from gradio import Blocks

log = logging.getLogger("covey.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
EMPTY_ANSWER = "*(empty answer: the model produced only whitespace or special tokens)*"
Message = dict[str, str]
WAITING: Message = {"role": "assistant", "content": "…"}
CUSTOM = "custom"
"""The preset control's value when the settings match no preset."""


def control_values(settings: GenerationSettings) -> list[Any]:
    """The generation controls' values, in their order (seed -1: none)."""
    s = settings
    seed = -1 if s.seed is None else s.seed
    return [s.sample, s.temperature, s.top_p, s.top_k, s.num_beams, s.repetition_penalty,
            s.max_new_tokens, seed]  # fmt: skip


# --- the run tab's data ---------------------------------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class RunView:
    """What the run tab shows, read from the run folder once at start-up."""

    loss_image: Path | None
    losses: Table
    contributions: Table
    flock: Table | None
    notes: list[str] = field(default_factory=list)


def read_run_view(run: Path, scratch: Path) -> RunView:
    """Rounds, losses and contributions of a run folder; `scratch` receives a fresh loss plot
    when the run has metrics but no loss.png (e.g. copied without it)."""
    from covey.fed.runfolder import ROUND_RECORD, RoundRecord, complete_rounds, round_dir

    notes: list[str] = []
    records = []
    for index in complete_rounds(run):
        try:
            record = json.loads((round_dir(run, index) / ROUND_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            notes.append(f"round {index}: round.json unreadable ({e})")
            continue
        if isinstance(record, dict):
            records.append(record)
    metrics = _read_metrics(run / "metrics.jsonl", notes) or records

    losses = Table(["round", "held-out loss", "perplexity", "clients' training loss"])
    scored = any("rouge_l" in (m.get("eval") or {}) for m in metrics)
    if scored:  # the rounds score answers too (eval.rouge_examples)
        losses.headers += ["ROUGE-L F1", "heavy repetition"]
    for m in metrics:
        evaluated, train = m.get("eval") or {}, m.get("train") or {}
        row = [
            m.get("round"),
            _num(evaluated.get("loss")),
            _num(evaluated.get("perplexity")),
            _num(train.get("loss")),
        ]
        if scored:
            row += [_num(evaluated.get("rouge_l")), _num(evaluated.get("heavy_repetition"))]
        losses.rows.append(row)

    image: Path | None = run / "loss.png"
    if image is not None and not image.is_file():
        image = None
        plottable = [
            RoundRecord.from_dict(m)
            for m in metrics
            if isinstance(m.get("round"), int)
            and isinstance((m.get("eval") or {}).get("loss"), float)
        ]
        if plottable:
            from covey.fed.report import plot_losses

            image = scratch / "loss.png"
            plot_losses(plottable, image)

    contributions = Table(
        ["round", "client", "samples", "training loss", "update norm", "status", "reason"]
    )
    flock = Table(["round", *ROUND_COLUMNS])
    for record in records:
        r = record.get("round")
        for c in record.get("clients") or []:
            contributions.rows.append(
                [
                    r,
                    c.get("client"),
                    c.get("num_samples"),
                    _num(c.get("train_loss")),
                    _num(c.get("update_norm")),
                    "accepted",
                    "",
                ]
            )
        for c in record.get("rejected") or []:
            contributions.rows.append(
                [r, c.get("client"), None, None, None, "rejected", c.get("reason", "")]
            )
        flock.rows += [[r, *row] for row in round_rows(record.get("flock") or {})]
    return RunView(image, losses, contributions, flock if flock.rows else None, notes)


def _read_metrics(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            notes.append(f"{path.name} line {number}: not JSON, skipped")
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def _num(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def load_examples(cfg: RunConfig, limit: int = 8) -> list[list[str]]:
    """Instructions (and contexts) from the run's held-out test set, spread over it."""
    from covey.data.records import load_records

    path = Path(cfg.data.dir) / "test.jsonl"
    if limit < 1 or not path.is_file():
        return []
    try:
        records = load_records(path).records
    except CoveyError as e:
        log.warning("no examples: %s", e)
        return []
    step = max(1, len(records) // limit)
    return [[r.instruction, r.context] for r in records[::step][:limit]]


# --- safety -------------------------------------------------------------------------------


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`user:password` from the environment (None or empty: no auth)."""
    if value is None or not value.strip():
        return None
    user, sep, password = value.partition(":")
    if not sep or not user.strip() or not password:
        raise ConfigError(
            f"{SERVE_AUTH_ENV} must be user:password (both non-empty); "
            "unset it to serve without auth"
        )
    return user.strip(), password


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


# --- the app --------------------------------------------------------------------------------


def require_gradio() -> None:
    """Fail fast, before a model loads, when Gradio is not installed."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError(
            "covey serve needs Gradio, which is not installed; "
            "install it with `pip install 'gradio>=6,<7'`"
        )


def _import_gradio() -> Any:
    """Gradio, or a ConfigError that says how to install it.

    Its usage analytics (they would phone home; this stays local) are turned off where they
    start, by `gr.Blocks(analytics_enabled=False)` in `build_app`, not through the process-wide
    GRADIO_ANALYTICS_ENABLED: the launch's own reports and its version check follow that flag,
    and gradio's monitoring dashboard (the one other Blocks) stays off (`launch`).
    """
    try:
        import gradio
    except ImportError as e:
        raise ConfigError(
            f"covey serve needs Gradio ({e}); install it with `pip install 'gradio>=6,<7'`"
        ) from None
    return gradio


def build_app(
    session: ServeSession,
    defaults: GenerationSettings | None = None,
    examples: list[list[str]] | None = None,
    run_view: RunView | None = None,
) -> Blocks:
    """The two-tab Blocks app for one resident session (not launched)."""
    gr = _import_gradio()
    d = defaults or GenerationSettings()
    source = session.source
    title = (
        f"**base** `{source.cfg.model.base}` · **adapter** {source.label} "
        f"(`{source.adapter_dir}`) · **template** {session.template}"
    )

    def settings_from(*controls: Any) -> GenerationSettings:
        sample, temperature, top_p, top_k, beams, penalty, max_new_tokens, seed = controls
        return GenerationSettings(
            sample=bool(sample),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            num_beams=int(beams),
            repetition_penalty=float(penalty),
            max_new_tokens=int(max_new_tokens),
            seed=None if seed is None or int(seed) < 0 else int(seed),
        )

    def respond(
        instruction: str,
        context: str,
        base_history: list[Message],
        tuned_history: list[Message],
        *controls: Any,
    ) -> Iterator[tuple[Any, ...]]:
        instruction, context = (instruction or "").strip(), (context or "").strip()
        if not instruction:
            raise gr.Error("Type an instruction first.")
        settings = settings_from(*controls)
        try:
            settings.check()
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        shown = f"{instruction}\n\n{context}" if context else instruction
        histories = (
            [*base_history, {"role": "user", "content": shown}, dict(WAITING)],
            [*tuned_history, {"role": "user", "content": shown}, dict(WAITING)],
        )

        def panes() -> tuple[list[Message], list[Message]]:  # copies: each update stands alone
            return list(histories[0]), list(histories[1])

        skip = gr.skip()
        yield *panes(), skip, skip
        texts: tuple[str, ...] = ("", "")
        for texts in session.stream(instruction, context, settings, (BASE, TUNED)):
            for history, text in zip(histories, texts, strict=True):
                history[-1] = {"role": "assistant", "content": text or "…"}
            yield *panes(), skip, skip
        for history, text in zip(histories, texts, strict=True):
            history[-1] = {"role": "assistant", "content": text or EMPTY_ANSWER}
        yield *panes(), *panes()

    with gr.Blocks(title="Covey: base vs fine-tuned", analytics_enabled=False) as demo:
        gr.Markdown(f"## Covey: base model vs fine-tuned adapter\n{title}")
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        base_chat = gr.Chatbot(
                            label="base model",
                            elem_id="base-chat",
                            height=420,
                            buttons=["copy_all"],
                        )
                        tuned_chat = gr.Chatbot(
                            label=f"fine-tuned ({source.label})",
                            elem_id="tuned-chat",
                            height=420,
                            buttons=["copy_all"],  # no share button: nothing leaves this machine
                        )
                    instruction = gr.Textbox(
                        label="instruction",
                        placeholder="Ask both models; the training prompt template is applied.",
                        lines=2,
                        max_lines=8,
                        elem_id="instruction",
                    )
                    context = gr.Textbox(
                        label="context (optional input for the instruction)",
                        lines=1,
                        max_lines=8,
                        elem_id="context",
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        clear = gr.Button("Clear", elem_id="clear")
                with gr.Column(scale=1, min_width=240):
                    gr.Markdown("### Generation")
                    preset = gr.Radio(
                        [*PRESETS, CUSTOM],
                        value=d.preset() or CUSTOM,
                        label="preset",
                        info="greedy: deterministic, streams; shepherd: Shepherd's 4-beam search",
                        elem_id="preset",
                    )
                    described = gr.Markdown(d.describe(), elem_id="generation-settings")
                    sample = gr.Checkbox(
                        value=d.sample,
                        label="sample",
                        info="off: the likeliest token, the same answer every time",
                        elem_id="sample",
                    )
                    temperature = gr.Slider(
                        0.05,
                        2,
                        value=d.temperature,
                        step=0.05,
                        label="temperature",
                        info="sampling only",
                        elem_id="temperature",
                    )
                    top_p = gr.Slider(
                        0.05,
                        1,
                        value=d.top_p,
                        step=0.05,
                        label="top-p",
                        info="sampling only",
                        elem_id="top-p",
                    )
                    top_k = gr.Slider(
                        0,
                        200,
                        value=d.top_k,
                        step=1,
                        label="top-k",
                        info="sampling only; 0: no limit",
                        elem_id="top-k",
                    )
                    beams = gr.Slider(
                        1,
                        8,
                        value=d.num_beams,
                        step=1,
                        label="beams",
                        info="1 streams tokens as they come; more answer all at once",
                        elem_id="beams",
                    )
                    penalty = gr.Slider(
                        1,
                        2,
                        value=d.repetition_penalty,
                        step=0.05,
                        label="repetition penalty",
                        info="1: off",
                        elem_id="repetition-penalty",
                    )
                    max_new = gr.Slider(
                        1,
                        1024,
                        value=d.max_new_tokens,
                        step=1,
                        label="max new tokens",
                        elem_id="max-new-tokens",
                    )
                    seed = gr.Number(
                        value=-1 if d.seed is None else d.seed,
                        precision=0,
                        label="seed",
                        info="sampling only; -1: fresh randomness",
                        elem_id="seed",
                    )
            if examples:
                gr.Examples(
                    examples=examples,
                    inputs=[instruction, context],
                    label="held-out test instructions",
                    examples_per_page=len(examples),
                )
            controls = [sample, temperature, top_p, top_k, beams, penalty, max_new, seed]

            def choose_preset(name: str, *current: Any) -> tuple[Any, ...]:
                if name not in PRESETS:  # "custom" is where the controls are, not a choice
                    return (gr.skip(),) * (len(controls) + 1)
                kept = settings_from(*current)
                chosen = replace(PRESETS[name], max_new_tokens=kept.max_new_tokens, seed=kept.seed)
                return *control_values(chosen), chosen.describe()

            def describe(*current: Any) -> tuple[str, str]:
                settings = settings_from(*current)
                return settings.preset() or CUSTOM, settings.describe()

            # `input` fires on the user's changes only, so the two handlers do not chase each other
            preset.input(
                choose_preset, [preset, *controls], [*controls, described], api_visibility="private"
            )
            for control in controls:
                control.input(describe, controls, [preset, described], api_visibility="private")

            base_state = gr.State([])
            tuned_state = gr.State([])
            inputs = [instruction, context, base_state, tuned_state, *controls]
            outputs = [base_chat, tuned_chat, base_state, tuned_state]
            # the instruction stays in its box: the question remains in view with its answers
            gr.on([send.click, instruction.submit], respond, inputs, outputs, api_name="compare")
            clear.click(
                lambda: ([], [], [], []),
                None,
                [base_chat, tuned_chat, base_state, tuned_state],
                api_visibility="private",
            )
        with gr.Tab("Run"):
            _run_tab(gr, run_view)
    return cast("Blocks", demo)


def _run_tab(gr: Any, view: RunView | None) -> None:
    if view is None:
        gr.Markdown("This adapter was not served from a run folder (`--run`): no rounds to show.")
        return
    if view.loss_image is not None:
        from PIL import Image

        with Image.open(view.loss_image) as image:
            image.load()  # in memory: the file may be a temporary one
        gr.Image(
            value=image,
            label="held-out quality per round",
            type="pil",
            format="png",
            interactive=False,
            height=360,
        )
    gr.Dataframe(
        value=view.losses.rows or None,
        headers=view.losses.headers,
        label="held-out loss (and ROUGE-L) per round",
        interactive=False,
    )
    gr.Dataframe(
        value=view.contributions.rows or None,
        headers=view.contributions.headers,
        label="clients' contributions per round",
        interactive=False,
        elem_id="contributions",
    )
    if view.flock is not None:
        gr.Dataframe(
            value=view.flock.rows,
            headers=view.flock.headers,
            label="FLock: rewards and slashes per participant",
            interactive=False,
            elem_id="flock",
        )
    else:
        gr.Markdown("No FLock section in these rounds (plain federated run).")
    for note in view.notes:
        gr.Markdown(f"note: {note}")


def launch_app(
    demo: Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    auth: tuple[str, str] | None = None,
) -> tuple[str, str | None]:
    """Start serving `demo` in the background: (local URL, public share URL or None)."""
    demo.queue(default_concurrency_limit=1)  # one resident model: answers take turns
    _, local_url, share_url = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        auth_message=f"Covey: log in with the credentials set in {SERVE_AUTH_ENV}",
        ssr_mode=False,
        # gradio's /monitoring endpoint (on by default) would build gradio's own dashboard
        # app, whose analytics follow GRADIO_ANALYTICS_ENABLED, not `build_app`'s flag
        enable_monitoring=False,
        show_error=True,
        prevent_thread_lock=True,
        quiet=True,
    )
    return str(local_url), str(share_url) if share_url else None


def serve_app(
    session: ServeSession,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    defaults: GenerationSettings | None = None,
    auth: tuple[str, str] | None = None,
    max_examples: int = 8,
) -> None:
    """Build the app for `session` and serve it until interrupted (Ctrl+C)."""
    with tempfile.TemporaryDirectory(prefix="covey-serve-") as scratch:
        run = session.source.run_dir
        view = read_run_view(run, Path(scratch)) if run is not None else None
        examples = load_examples(session.source.cfg, max_examples)
        demo = build_app(session, defaults, examples, view)  # reads the plot into memory
    local_url, share_url = launch_app(demo, host, port, share, auth)
    print(f"Covey is serving on {local_url} (Ctrl+C stops it)", flush=True)
    if share_url:
        print(f"public link: {share_url}", flush=True)
    demo.block_thread()
