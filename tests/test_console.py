"""No hidden side effects: importing Covey configures nothing, a command hides only the library
warnings it names, and plotting leaves matplotlib as the program set it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


PLOT_EVERY_FIGURE = """
import sys
from pathlib import Path

import matplotlib

out = Path(sys.argv[1])
before = repr(dict.__getitem__(matplotlib.rcParams, "backend"))  # unresolved: not read yet

from covey.data.plot import plot_distribution
from covey.eval.report import plot_comparison
from covey.fed.report import plot_losses
from covey.fed.runfolder import RoundRecord
from covey.flock.report import plot_rewards

plot_losses(
    [RoundRecord.from_dict({"round": 0, "eval": {"loss": 2.0}}),
     RoundRecord.from_dict({"round": 1, "eval": {"loss": 1.5}, "train": {"loss": 1.7}})],
    out / "loss.png",
)
plot_distribution(
    {"categories": ["qa", "summary"], "scheme": "iid", "seed": 1,
     "clients": [{"by_category": {"qa": 3}}, {"by_category": {"qa": 1, "summary": 2}}]},
    out / "split.png",
)
plot_rewards(
    {"rounds": [{"balances": [{"participant": 0, "net": 1.0}]}],
     "participants": [{"participant": 0, "attacker": False}]},
    out / "rewards.png",
)
plot_comparison(
    {"test": {"records": 3}, "models": [
        {"name": "base", "by_category": {"qa": {"rouge_l": 0.2}}, "rouge_l": 0.2,
         "heavy_repetition": 0.1}]},
    out / "comparison.png",
)
after = repr(dict.__getitem__(matplotlib.rcParams, "backend"))
print(before == after, "matplotlib.pyplot" in sys.modules)
"""


def test_plots_leave_matplotlib_as_the_program_set_it(tmp_path: Path) -> None:
    """Covey draws on Figures of its own: no backend switch (`matplotlib.use`), no pyplot, whose
    global figure list is not safe in the UI's threads."""
    done = subprocess.run(
        [sys.executable, "-c", PLOT_EVERY_FIGURE, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
    for name in ("loss.png", "split.png", "rewards.png", "comparison.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
