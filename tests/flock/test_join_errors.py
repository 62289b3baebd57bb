"""Bad input to `covey flock join`/`fetch`/`status` is a clear error that names the problem and
the fix: a missing key file, an unreachable chain, an address that is not a Covey task, a base
model with other weights than the bundle's, too few tokens for the stake. (A gateway serving
wrong bytes: tests/store/test_gateway.py and test_protocol's tampered proposal.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from covey.cli import app
from covey.config import load_recipe
from covey.errors import ConfigError, CoveyError
from covey.flock.agent import stake_and_join
from covey.flock.bundle import TaskBundle, bundle_recipe, weights_sha256
from covey.flock.chain import Chain, ChainError
from covey.flock.network import attach_task, connect, task_model
from covey.model.loading import load_base_model
from tests.flock import World
from tests.model.tiny import make_tiny_model_dir

runner = CliRunner()


def test_join_without_a_readable_key_says_where_keys_come_from(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "flock", "join", "0x" + "11" * 20, "--chain-url", "http://127.0.0.1:9",
            "--key-file", str(tmp_path / "missing.key"), "--data", str(tmp_path / "d.jsonl"),
            "--state", str(tmp_path / "state"),
        ],
    )  # fmt: skip
    assert isinstance(result.exception, ConfigError)  # `covey` prints it alone, exit code 2
    assert "missing.key does not exist" in str(result.exception)


def test_an_unreachable_chain_is_named_without_its_secret_path() -> None:
    with pytest.raises(ChainError, match="cannot reach an Ethereum JSON-RPC endpoint") as e:
        Chain.connect("http://127.0.0.1:9/secret-api-key", timeout=2)
    assert "secret-api-key" not in str(e.value)
    with pytest.raises(ConfigError, match="--chain-url is required"):
        connect("", signer=False)


@pytest.mark.chain
def test_an_address_that_is_not_a_covey_task_is_refused() -> None:
    world = World.create(accounts=3)
    with pytest.raises(ConfigError, match="is not a Covey FLock task"):
        attach_task(world.chain, world.token.address)  # a contract, but an ERC-20
    with pytest.raises(ConfigError, match="no contract at"):
        attach_task(world.chain, world.people[0])  # an account


@pytest.mark.chain
def test_joining_without_tokens_for_the_stake_says_who_must_fund_whom() -> None:
    world = World.create(accounts=3)
    task = world.task()
    broke = world.chain.accounts[-1]
    world.token.transfer(world.creator, world.token.balance_of(broke), sender=broke)
    with pytest.raises(CoveyError, match="the stake is 10: ask the task's creator to fund"):
        stake_and_join(task, broke, "", "broke")
    assert not task.joined(broke)


def test_a_base_model_with_other_weights_than_the_bundles_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = load_recipe(None, [f"model.base='{tiny_model_dir}'"])
    model, _ = load_base_model(cfg.model)
    bundle = TaskBundle(
        recipe=bundle_recipe(cfg),
        base_model="tiny",
        base_weights_sha256=weights_sha256(model),
        initial_adapter="bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
    )
    assert task_model(cfg, bundle).base_model_id == "tiny"  # the same weights load
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    changed = load_recipe(None, [f"model.base='{other}'"])
    with pytest.raises(ConfigError, match="is not the task's base model: its weights hash"):
        task_model(changed, bundle)
