"""No hidden side effects: importing Covey configures nothing; a command hides only the library
warnings it names."""

from __future__ import annotations

import json
import subprocess
import sys

IMPORTS_EVERY_COMMAND = """
import json, logging, os, warnings
import typer.rich_utils

# the libraries first: what they do to filters and the environment at import is theirs
import flwr.app, flwr.clientapp, flwr.serverapp, gradio, peft, torch, transformers

def snapshot():
    return {
        "filters": [repr(f) for f in warnings.filters],
        "typer_width": typer.rich_utils.MAX_WIDTH,
        "root_handlers": len(logging.getLogger().handlers),
        "root_level": logging.getLogger().level,
        "environ": dict(os.environ),
    }

before = snapshot()
import covey.cli, covey.eval.command, covey.flock.cli, covey.flower.cli, covey.flower.client_app
import covey.serve.app, covey.serve.commands, covey.fed.rounds
covey.serve.app._import_gradio()  # gradio itself, as `covey serve` and the tests import it
after = snapshot()
print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}))
"""


def test_importing_covey_changes_no_library_setting_or_environment_variable() -> None:
    """Run off a terminal (stdout is a pipe), where cli.py used to widen Typer's help at import;
    serve's code used to set GRADIO_ANALYTICS_ENABLED, and the CPU-sharing OMP_WAIT_POLICY
    belongs to commands alone."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_EVERY_COMMAND], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    if "environ" in changed:
        before, after = changed.pop("environ")
        changed["environ"] = {k: after.get(k) for k in before.keys() | after.keys()
                              if before.get(k) != after.get(k)}  # fmt: skip
    assert changed == {}


QUIET_THEN_WARN = """
import warnings
from covey.console import quiet_libraries

quiet_libraries()
with warnings.catch_warnings(record=True) as shown:
    # the one FutureWarning a command hides, from where transformers raises it
    warnings.warn_explicit(
        "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
        "modeling_utils.py", 1, module="transformers.modeling_utils",
    )
    # the same words from another module, and another library's FutureWarning, still show
    warnings.warn_explicit(
        "`is_gradient_checkpointing` is deprecated", FutureWarning, "other.py", 1, module="other"
    )
    warnings.warn_explicit(
        "this argument changes meaning in v6", FutureWarning, "modeling_utils.py", 2,
        module="transformers.modeling_utils",
    )
print([(str(w.message), w.filename) for w in shown])
"""


def test_a_command_hides_only_the_library_warnings_it_names() -> None:
    done = subprocess.run(
        [sys.executable, "-c", QUIET_THEN_WARN], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == repr(
        [
            ("`is_gradient_checkpointing` is deprecated", "other.py"),
            ("this argument changes meaning in v6", "modeling_utils.py"),
        ]
    )
