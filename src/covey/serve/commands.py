"""`covey serve`, `covey generate` and `covey export`: flags in, one function call, output out.

Plain Typer command functions, registered on the `covey` app in `covey.cli`. Heavy imports
(torch, transformers, gradio) happen inside them, so `covey --help` stays fast. Every check that
can fail (folders, rounds, base model, adapter shapes, settings, auth variable) runs before a
model loads or a server starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from covey.console import quiet_libraries, share_the_cpu
from covey.envvars import SERVE_AUTH_ENV
from covey.errors import ConfigError
from covey.model.generate import DEFAULT_PRESET, PRESETS, GenerationSettings, preset_settings
from covey.serve.adapters import AdapterSource, resolve_source
from covey.serve.generate import BASE, TUNED, ServeSession

err = Console(stderr=True, soft_wrap=True)  # paths stay whole in logs

# Options shared by the three commands (Typer reads them from each function's defaults).
_RUN_HELP = "Run folder of `covey train` (its run.out); uses final/ unless --round."
_ROUND_HELP = "Use round_<K>/ of the run instead of final/ (0 = before training)."
_BASE_HELP = "Base model (folder, .gguf, pkg:PACKAGE/FILE or hub id); default: the run's."
_ADAPTER_HELP = "A PEFT adapter folder, instead of --run (with --base if it names no base)."
_TEMPLATE_HELP = "Prompt template, alpaca or chat; default: the one used in training."
_DEVICE_HELP = "auto, cpu, cuda or cuda:N; default: the run's model.device."
_PRESET_HELP = (
    f"Decoding preset: {', '.join(PRESETS)}. greedy: deterministic, streams, repetition "
    "penalty; shepherd: Shepherd's 4-beam search, deterministic. The flags below change it."
)
_PRESET_OPTION = typer.Option(DEFAULT_PRESET, "--preset", help=_PRESET_HELP)
_SAMPLE_OPTION = typer.Option(
    None, "--sample/--no-sample", help="Sample tokens (temperature, top-p, top-k apply)."
)
_TEMPERATURE_OPTION = typer.Option(None, help="Sampling temperature (> 0).")
_TOP_P_OPTION = typer.Option(None, help="Sampling: nucleus probability mass.")
_TOP_K_OPTION = typer.Option(None, help="Sampling: among the k likeliest tokens (0: all).")
_BEAMS_OPTION = typer.Option(None, "--beams", help="Beam count; 1 streams tokens as they come.")
_PENALTY_OPTION = typer.Option(None, help="Repetition penalty (1: off).")
_MAX_NEW_OPTION = typer.Option(None, help="Length limit of the answer, in tokens.")
_SEED_OPTION = typer.Option(None, help="Sampling: the same seed gives the same answer.")
_THREADS_OPTION = typer.Option(
    0,
    "--threads",
    min=0,
    help="CPU threads for decoding; 0: torch's default (all cores). 1 is faster when busy.",
)


def _settings(
    preset: str,
    sample: bool | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    beams: int | None,
    repetition_penalty: float | None,
    max_new_tokens: int | None,
    seed: int | None,
) -> GenerationSettings:
    return preset_settings(
        preset,
        sample=sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_beams=beams,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )


def serve(
    run: Path | None = typer.Option(None, "--run", help=_RUN_HELP),
    round_index: int | None = typer.Option(None, "--round", help=_ROUND_HELP),
    base: str | None = typer.Option(None, "--base", help=_BASE_HELP),
    adapter: Path | None = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    template: str | None = typer.Option(None, "--template", help=_TEMPLATE_HELP),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind; the default lets in this machine only."
    ),
    port: int | None = typer.Option(None, help="Port; default 7860, or the next free one."),
    share: bool = typer.Option(
        False,
        "--share",
        help="Also open a public gradio.live link (anyone with the link can use it).",
    ),
    preset: str = _PRESET_OPTION,
    sample: bool | None = _SAMPLE_OPTION,
    temperature: float | None = _TEMPERATURE_OPTION,
    top_p: float | None = _TOP_P_OPTION,
    top_k: int | None = _TOP_K_OPTION,
    beams: int | None = _BEAMS_OPTION,
    repetition_penalty: float | None = _PENALTY_OPTION,
    max_new_tokens: int | None = _MAX_NEW_OPTION,
    seed: int | None = _SEED_OPTION,
    examples: int = typer.Option(8, help="Examples drawn from the run's test.jsonl (0: none)."),
    threads: int = _THREADS_OPTION,
) -> None:
    """Chat with the base model and the fine-tuned adapter side by side (Gradio).

    The generation flags set the controls' initial values. Basic auth: set
    COVEY_SERVE_AUTH=user:password in the environment (never a flag).
    """
    from covey.serve.app import is_loopback, parse_auth, require_gradio, serve_app
    from covey.serve.decode import decoding_threads
    from covey.serve.generate import load_session

    share_the_cpu()
    require_gradio()
    auth = parse_auth(os.environ.get(SERVE_AUTH_ENV))
    settings = _settings(
        preset, sample, temperature, top_p, top_k, beams, repetition_penalty, max_new_tokens, seed
    )
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port {port}: expected 1..65535")
    source = resolve_source(run, round_index, base, adapter, template, device)
    quiet_libraries()
    err.print(f"loading {source.cfg.model.base} with {source.label}", highlight=False)
    session = load_session(source)
    with decoding_threads(threads, session.device) as count:
        err.print(
            f"serving {source.label} of {source.adapter_dir} on {source.cfg.model.base}; "
            f"generation: {settings.describe()}{_threads_note(session, count)}",
            highlight=False,
        )
        if auth is None and (share or not is_loopback(host)):
            err.print(
                f"[yellow]warning: no login required and reachable beyond this machine "
                f"({'--share' if share else host}); "
                f"set {SERVE_AUTH_ENV}=user:password to require one[/]"
            )
        if auth is not None:
            err.print(f"login required (user {auth[0]!r}, from {SERVE_AUTH_ENV})", highlight=False)
        serve_app(session, host, port, share, settings, auth, examples)


def _threads_note(session: ServeSession, count: int) -> str:
    return f"; {count} CPU thread{'s' * (count > 1)}" if session.device.type == "cpu" else ""


def generate(
    instruction: str = typer.Argument(..., help="The instruction to answer."),
    context: str = typer.Option("", "--context", "-c", help="Optional input for it."),
    run: Path | None = typer.Option(None, "--run", help=_RUN_HELP),
    round_index: int | None = typer.Option(None, "--round", help=_ROUND_HELP),
    base: str | None = typer.Option(None, "--base", help=_BASE_HELP),
    adapter: Path | None = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    template: str | None = typer.Option(None, "--template", help=_TEMPLATE_HELP),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
    base_only: bool = typer.Option(False, "--base-only", help="Answer with the base model only."),
    both: bool = typer.Option(
        False, "--both", help="Answer with the base and the fine-tuned model (one batch)."
    ),
    preset: str = _PRESET_OPTION,
    sample: bool | None = _SAMPLE_OPTION,
    temperature: float | None = _TEMPERATURE_OPTION,
    top_p: float | None = _TOP_P_OPTION,
    top_k: int | None = _TOP_K_OPTION,
    beams: int | None = _BEAMS_OPTION,
    repetition_penalty: float | None = _PENALTY_OPTION,
    max_new_tokens: int | None = _MAX_NEW_OPTION,
    seed: int | None = _SEED_OPTION,
    threads: int = _THREADS_OPTION,
) -> None:
    """Print the fine-tuned adapter's answer (or the base model's, or both), as it comes."""
    from covey.serve.decode import decoding_threads
    from covey.serve.generate import load_session

    share_the_cpu()
    if base_only and both:
        raise ConfigError("--base-only and --both exclude each other; choose one")
    if not instruction.strip():
        raise ConfigError("the instruction is empty")
    settings = _settings(
        preset, sample, temperature, top_p, top_k, beams, repetition_penalty, max_new_tokens, seed
    )
    source = resolve_source(run, round_index, base, adapter, template, device)
    quiet_libraries()
    session = load_session(source)
    with decoding_threads(threads, session.device) as count:
        err.print(
            f"generation: {settings.describe()}{_threads_note(session, count)}", highlight=False
        )
        _print_answers(session, instruction, context, settings, both, base_only, source.label)


def _print_answers(
    session: ServeSession,
    instruction: str,
    context: str,
    settings: GenerationSettings,
    both: bool,
    base_only: bool,
    label: str,
) -> None:
    """The first pane's answer as it grows, then the second's (complete by then)."""
    panes = (BASE,) if base_only else (BASE, TUNED) if both else (TUNED,)
    names = {BASE: "base model", TUNED: f"fine-tuned ({label})"}
    if both:
        print(f"--- {names[BASE]} ---", flush=True)
    shown = ""
    texts: tuple[str, ...] = ("",) * len(panes)
    for texts in session.stream(instruction, context, settings, panes):
        if texts[0].startswith(shown):  # else: the last value, stripped of trailing space
            sys.stdout.write(texts[0][len(shown) :])
            sys.stdout.flush()
            shown = texts[0]
    print(flush=True)
    if both:
        print(f"--- {names[TUNED]} ---\n{texts[1]}", flush=True)


def export(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged model."),
    run: Path | None = typer.Option(None, "--run", help=_RUN_HELP),
    round_index: int | None = typer.Option(None, "--round", help=_ROUND_HELP),
    base: str | None = typer.Option(None, "--base", help=_BASE_HELP),
    adapter: Path | None = typer.Option(None, "--adapter", help=_ADAPTER_HELP),
    device: str | None = typer.Option(None, "--device", help=_DEVICE_HELP),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
) -> None:
    """Merge the adapter into the base weights: a plain transformers model folder."""
    from covey.serve.export import export_merged

    source: AdapterSource = resolve_source(run, round_index, base, adapter, None, device)
    quiet_libraries()
    err.print(f"merging {source.label} into {source.cfg.model.base}", highlight=False)
    result = export_merged(source, out, overwrite)
    print(
        f"wrote {result.out}/: {source.label} merged into {source.cfg.model.base} "
        f"({result.parameters / 1e6:.1f}M parameters); load it with "
        f"AutoModelForCausalLM.from_pretrained({str(result.out)!r})"
    )
