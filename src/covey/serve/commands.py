"""`covey serve`, `covey generate` and `covey export`: flags in, one function call, output out.

The functions are plain Typer commands, registered on `app` here and meant to be registered on
the main `covey` app too (`app.command("serve")(serve)`). Heavy imports (torch, transformers,
gradio) happen inside them, so `covey --help` stays fast. Every check that can fail (folders,
rounds, base model, adapter shapes, auth variable) runs before a model loads or a server starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from covey.errors import ConfigError, CoveyError
from covey.serve.generate import AdapterSource, GenerationSettings

app = typer.Typer(
    help="Serve, query and export a trained Covey adapter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # paths stay whole in logs
_d = GenerationSettings()

# Options shared by the three commands (Typer reads them from each function's defaults).
_RUN_HELP = "Run folder of `covey train` (its run.out); uses final/ unless --round."
_ROUND_HELP = "Use round_<K>/ of the run instead of final/ (0 = before training)."
_BASE_HELP = "Base model (folder, .gguf, pkg:PACKAGE/FILE or hub id); default: the run's."
_ADAPTER_HELP = "A PEFT adapter folder, instead of --run (with --base if it has no config.toml)."
_TEMPLATE_HELP = "Prompt template, alpaca or chat; default: the one used in training."
_DEVICE_HELP = "auto, cpu, cuda or cuda:N; default: the run's model.device."


def _source(
    run: Path | None,
    round_index: int | None,
    base: str | None,
    adapter: Path | None,
    template: str | None,
    device: str | None,
) -> AdapterSource:
    from covey.serve.generate import resolve_source

    return resolve_source(run, round_index, base, adapter, template, device)


def _settings(
    temperature: float, top_p: float, top_k: int, beams: int, max_new_tokens: int, seed: int | None
) -> GenerationSettings:
    settings = GenerationSettings(temperature, top_p, top_k, beams, max_new_tokens, seed)
    settings.check()
    return settings


def _quiet_libraries() -> None:
    """Covey prints what matters; the libraries' progress bars and notices would drown it."""
    import logging
    import warnings

    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # its helpers carry no annotations
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # raised inside PEFT's adapter loading by transformers 5.x; harmless
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command("serve")
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
    temperature: float = typer.Option(_d.temperature, help="Initial temperature control."),
    top_p: float = typer.Option(_d.top_p, help="Initial top-p control."),
    top_k: int = typer.Option(_d.top_k, help="Initial top-k control."),
    beams: int = typer.Option(_d.num_beams, help="Initial beams control (1 streams tokens)."),
    max_new_tokens: int = typer.Option(_d.max_new_tokens, help="Initial max new tokens."),
    seed: int | None = typer.Option(None, help="Initial seed control (none: fresh randomness)."),
    examples: int = typer.Option(8, help="Examples drawn from the run's test.jsonl (0: none)."),
) -> None:
    """Chat with the base model and the fine-tuned adapter side by side (Gradio).

    Basic auth: set COVEY_SERVE_AUTH=user:password in the environment (never a flag).
    """
    from covey.serve.app import AUTH_ENV, is_loopback, parse_auth, require_gradio, serve_app
    from covey.serve.generate import load_session

    require_gradio()
    auth = parse_auth(os.environ.get(AUTH_ENV))
    settings = _settings(temperature, top_p, top_k, beams, max_new_tokens, seed)
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port {port}: expected 1..65535")
    source = _source(run, round_index, base, adapter, template, device)
    _quiet_libraries()
    with err.status(f"loading {source.cfg.model.base} with {source.label}"):
        session = load_session(source)
    err.print(f"serving {source.label} of {source.adapter_dir} on {source.cfg.model.base}")
    if auth is None and (share or not is_loopback(host)):
        err.print(
            f"[yellow]warning: no login required and reachable beyond this machine "
            f"({'--share' if share else host}); set {AUTH_ENV}=user:password to require one[/]"
        )
    if auth is not None:
        err.print(f"login required (user {auth[0]!r}, from {AUTH_ENV})")
    serve_app(session, host, port, share, settings, auth, examples)


@app.command("generate")
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
    both: bool = typer.Option(False, "--both", help="Answer with the base, then fine-tuned."),
    temperature: float = typer.Option(
        _d.temperature, help="0: no sampling (greedy or beam search)."
    ),
    top_p: float = typer.Option(_d.top_p, help="Nucleus sampling mass."),
    top_k: int = typer.Option(_d.top_k, help="Sample among the k likeliest tokens (0: all)."),
    beams: int = typer.Option(_d.num_beams, help="Beam count; 1 prints tokens as they come."),
    max_new_tokens: int = typer.Option(_d.max_new_tokens, help="Length limit of the answer."),
    seed: int | None = typer.Option(None, help="Seed the sampler: the same answer every time."),
) -> None:
    """Print one answer from the fine-tuned adapter (or the base model, or both)."""
    from covey.serve.generate import load_session

    if base_only and both:
        raise ConfigError("--base-only and --both exclude each other; choose one")
    if not instruction.strip():
        raise ConfigError("the instruction is empty")
    settings = _settings(temperature, top_p, top_k, beams, max_new_tokens, seed)
    source = _source(run, round_index, base, adapter, template, device)
    _quiet_libraries()
    session = load_session(source)
    panes = [False] if base_only else [False, True] if both else [True]
    for adapter_on in panes:
        if both:
            name = f"fine-tuned ({source.label})" if adapter_on else "base model"
            print(f"--- {name} ---", flush=True)
        shown = ""
        for text in session.stream(instruction, context, settings, adapter=adapter_on):
            if text.startswith(shown):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
            shown = text
        print(flush=True)


@app.command("export")
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

    source = _source(run, round_index, base, adapter, None, device)
    _quiet_libraries()
    with err.status(f"merging {source.label} into {source.cfg.model.base}"):
        result = export_merged(source, out, overwrite)
    print(
        f"wrote {result.out}/: {source.label} merged into {source.cfg.model.base} "
        f"({result.parameters / 1e6:.1f}M parameters); load it with "
        f"AutoModelForCausalLM.from_pretrained({str(result.out)!r})"
    )


def main() -> None:
    """`python -m covey.serve.commands`: the same commands, the same error handling as covey."""
    try:
        app()
    except CoveyError as e:
        err.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
