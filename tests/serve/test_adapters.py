"""Choosing the adapter, and refusing ones that do not fit, before anything loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from covey.errors import ConfigError
from covey.serve.adapters import resolve_source
from covey.serve.generate import load_session

# --- which adapter ----------------------------------------------------------------------------


def test_a_run_serves_final_with_the_runs_template(tiny_run: Path) -> None:
    source = resolve_source(run=tiny_run)
    assert source.adapter_dir == tiny_run / "final"
    assert source.label == "round 2" and source.round_index == 2 and source.run_dir == tiny_run
    assert source.cfg.prompt.template == "chat"


def test_round_picks_that_rounds_folder(tiny_run: Path) -> None:
    source = resolve_source(run=tiny_run, round_index=1)
    assert source.adapter_dir == tiny_run / "round_001" and source.label == "round 1"


def test_an_adapter_folder_inside_a_run_finds_its_run(tiny_run: Path) -> None:
    source = resolve_source(adapter=tiny_run / "round_001", template="alpaca")
    assert source.run_dir == tiny_run and source.round_index == 1
    assert source.cfg.prompt.template == "alpaca"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run": Path("no/such/run")}, "no such folder"),
        ({}, "name the adapter with --run"),
        ({"adapter": Path("no/such/adapter")}, "no adapter_model.safetensors"),
    ],
)
def test_bad_flags_are_config_errors(kwargs: dict[str, Path], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_source(**kwargs)  # type: ignore[arg-type]


def test_run_and_adapter_together_and_round_without_run_are_refused(tiny_run: Path) -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        resolve_source(run=tiny_run, adapter=tiny_run / "final")
    with pytest.raises(ConfigError, match="--round needs --run"):
        resolve_source(adapter=tiny_run / "final", round_index=1)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a Covey run folder"):
        resolve_source(run=tmp_path)


def test_a_missing_round_names_the_rounds_there(tiny_run: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such round; complete rounds: 0\.\.2"):
        resolve_source(run=tiny_run, round_index=7)


def test_relative_paths_are_read_from_where_training_ran(
    tiny_run: Path,
    tiny_model_dir: Path,
    client_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`covey train` ran in work/ with run.out = runs/x, model.base = models/tiny: serving from
    elsewhere must still find the base and the test set."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work / "runs" / "x")
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    shutil.copytree(client_data_dir, work / "data")
    config = (work / "runs" / "x" / "config.toml").read_text()
    config = config.replace(f'"{tiny_model_dir}"', '"models/tiny"')
    config = config.replace(f'"{client_data_dir}"', '"data"').replace(f'"{tiny_run}"', '"runs/x"')
    (work / "runs" / "x" / "config.toml").write_text(config)
    monkeypatch.chdir(tmp_path)
    source = resolve_source(run=Path("work/runs/x"))
    assert Path(source.cfg.model.base) == (work / "models" / "tiny").resolve()
    assert Path(source.cfg.data.dir) == (work / "data").resolve()


def test_a_relative_data_dir_is_never_read_from_the_current_folder(
    tiny_run: Path, client_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training ran in work/ with data.dir = data; serving from a folder that holds another
    run's data/ must still show work/data's test set, never the current folder's."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work / "runs" / "x")
    shutil.copytree(client_data_dir, work / "data")
    config = (work / "runs" / "x" / "config.toml").read_text()
    config = config.replace(f'"{client_data_dir}"', '"data"').replace(f'"{tiny_run}"', '"runs/x"')
    (work / "runs" / "x" / "config.toml").write_text(config)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(client_data_dir, elsewhere / "data")  # another run's data, same name
    monkeypatch.chdir(elsewhere)
    assert Path(resolve_source(run=work / "runs" / "x").cfg.data.dir) == work / "data"
    moved = tmp_path / "moved" / "runs" / "renamed"  # two levels deep, as run.out = runs/x
    shutil.copytree(work / "runs" / "x", moved)
    assert Path(resolve_source(run=moved).cfg.data.dir) == tmp_path / "moved" / "data"


def test_with_an_absolute_run_out_a_relative_data_dir_is_inside_the_run_folder(
    tiny_run: Path, client_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where training ran is unknown when run.out is absolute: the run folder stands in, and
    the current folder's data/ is still never read."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = (run / "config.toml").read_text()
    assert f'"{tiny_run}"' in config  # run.out is absolute in the fixture
    (run / "config.toml").write_text(config.replace(f'"{client_data_dir}"', '"data"'))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(client_data_dir, elsewhere / "data")
    monkeypatch.chdir(elsewhere)
    assert Path(resolve_source(run=run).cfg.data.dir) == run / "data"


def _bare_adapter(tiny_run: Path, folder: Path, base_name: str) -> Path:
    """The final adapter's two PEFT files alone, as another tool would ship them."""
    folder.mkdir()
    shutil.copy(tiny_run / "final" / "adapter_model.safetensors", folder)
    config = json.loads((tiny_run / "final" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_bare_adapter_needs_base_unless_its_config_names_one(
    tiny_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    covey_made = _bare_adapter(tiny_run, tmp_path / "a", "tiny@0123456789abcdef")
    with pytest.raises(ConfigError, match="pass --base"):
        resolve_source(adapter=covey_made)
    source = resolve_source(adapter=covey_made, base=str(tiny_model_dir))
    assert source.cfg.model.base == str(tiny_model_dir) and source.run_dir is None
    assert source.cfg.prompt.template == "alpaca"  # Shepherd's, unless --template says otherwise
    foreign = _bare_adapter(tiny_run, tmp_path / "b", str(tiny_model_dir))
    assert resolve_source(adapter=foreign).cfg.model.base == str(tiny_model_dir)


# --- adapters that do not fit -----------------------------------------------------------------


def _rewrite_weights(folder: Path, edit: object) -> None:
    """Apply `edit(state) -> state` to an adapter's weights, keeping its metadata."""
    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = edit(load_file(path))  # type: ignore[operator]
    save_file(state, path, metadata=metadata)


def test_an_adapter_for_another_base_is_refused_before_loading(run_copy: Path) -> None:
    final = run_copy / "final"
    _rewrite_weights(final, lambda s: s)
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata["base_model"] = "SomeOtherModel@0123456789abcdef"
    save_file(load_file(final / "adapter_model.safetensors"), final / "adapter_model.safetensors",
              metadata=metadata)  # fmt: skip
    with pytest.raises(ConfigError, match="trained on base model SomeOtherModel@0123456789abcdef"):
        load_session(resolve_source(run=run_copy))


def test_a_different_base_given_with_base_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    from tests.model.tiny import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", pad_token=False)  # another config.json
    with pytest.raises(ConfigError, match="serve it with the base it was trained on"):
        load_session(resolve_source(run=tiny_run, base=str(other)))


def test_the_adapter_config_base_is_checked_too(run_copy: Path) -> None:
    config_path = run_copy / "final" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "gguf:ffffffffffffffff"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="gguf:ffffffffffffffff"):
        load_session(resolve_source(run=run_copy))


def test_an_adapter_whose_tensors_do_not_fit_is_refused(run_copy: Path) -> None:
    def widen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
                for k, v in state.items()}  # fmt: skip

    _rewrite_weights(run_copy / "final", widen)
    with pytest.raises(ConfigError, match=r"does not fit the base model: .*has 32 inputs"):
        load_session(resolve_source(run=run_copy))


def test_an_adapter_for_layers_the_base_lacks_is_refused(run_copy: Path) -> None:
    def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}

    _rewrite_weights(run_copy / "final", rename)
    with pytest.raises(ConfigError, match=r"adapts layer model\.layers\.7\..*lacks"):
        load_session(resolve_source(run=run_copy))
