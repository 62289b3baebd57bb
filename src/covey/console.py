"""What every `covey` command shares on its way to the terminal: the console, library noise, CPU.

The bottom of Covey's layers (it imports nothing of Covey), so every command module can use it
without importing `covey.cli` or another command. Nothing here runs at import: a command calls
`quiet_libraries()` and `share_the_cpu()` itself, so importing Covey as a library changes no
logging, warning filter or environment variable of the program that imports it.
"""

from __future__ import annotations

import re
import sys

from rich.console import Console

PLAIN_WIDTH = 160
"""Columns of rich's output off a terminal (CI logs, pipes): its default 80 would cut tables and
the option names in --help."""

console = Console(width=None if sys.stdout.isatty() else PLAIN_WIDTH)
"""The commands' standard output (tables, progress, summaries)."""

QUIET_WARNINGS = (
    # raised by transformers 5.x when PEFT's get_peft_model reads a deprecated attribute;
    # addressed to PEFT's developers, not to a user who fine-tunes
    ("`is_gradient_checkpointing` is deprecated", FutureWarning, "transformers.modeling_utils"),
)
"""(message prefix, category, module that warns) of each library warning a command hides; every
other warning shows. Flower's processes get the same list (`python_warnings`)."""

NOISY_LOGGERS = ("httpx", "huggingface_hub", "filelock")
"""Libraries whose INFO lines (each request, each lock) would drown Covey's own."""


def quiet_libraries() -> None:
    """Covey prints what matters: the libraries' progress bars, notices and the warnings in
    `QUIET_WARNINGS` (addressed to developers, not users) would drown it. Log lines are plain
    text off a terminal.

    For commands only (called once a command's own checks have passed, since it imports
    transformers): it configures logging and warning filters for the whole process.
    """
    import logging
    import warnings

    from huggingface_hub.utils.tqdm import disable_progress_bars
    from rich.logging import RichHandler
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=re.escape(message), category=category, module=re.escape(module)
        )
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_time=False, show_path=False
        )
    else:
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def python_warnings() -> str:
    """`QUIET_WARNINGS` as a PYTHONWARNINGS value, for child processes (Flower's)."""
    return ",".join(
        f"ignore:{message}:{category.__name__}:{module}"
        for message, category, module in QUIET_WARNINGS
    )


def share_the_cpu() -> None:
    """Idle OpenMP threads sleep instead of spinning. Answering is a long chain of small steps,
    on a CPU shared with the UI's threads or other jobs; spinning threads take the cores from
    whoever holds the work (3x slower `covey generate` on a busy 2-core machine,
    benchmarks/README.md).

    For commands only, before torch loads: OpenMP reads OMP_WAIT_POLICY once, when torch's
    runtime starts, and offers no call to set it, so the environment variable is the only way
    in. A value the user set wins.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
