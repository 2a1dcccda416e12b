"""Methods registered from outside the package: a toy agent and a toy rule run through `search` and `agmc search`."""
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agmc_jax.agents import Agent, AgentType, OptionError
from agmc_jax.data import load_arrays
from agmc_jax.embed import STATES
from agmc_jax.errors import AgmcError
from agmc_jax.kinds import KINDS
from agmc_jax.models import create_model, init_model
from agmc_jax.networks import load_network
from agmc_jax.search import METHODS, Method, register_method, search
from tests.test_cli import run

BASELINE = Path(__file__).parents[1] / "agmc_jax" / "baselines" / "lenet5_fashion_mnist"
MODULE = create_model("lenet5", 10)
VARIABLES = init_model(MODULE, (28, 28, 1))
RNG = np.random.default_rng(0)
DATA = (RNG.normal(size=(64, 28, 28, 1)).astype(np.float32), RNG.integers(0, 10, 64).astype(np.int32))


class ConstantConfig(NamedTuple):
    """The toy agent's one setting."""

    action: float = 0.5


class ConstantState(NamedTuple):
    """Episodes observed and update steps run (updates=0: the search must never run one)."""

    episodes: jax.Array
    updates: jax.Array


def constant_agent(config: ConstantConfig) -> Agent:
    """Always `config.action`, exploring or not; learns nothing."""
    def init(key, example_obs):
        return ConstantState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def act(state, obs, key, explore):
        return jnp.asarray(config.action, jnp.float32)

    def observe(state, episode_obs, episode_actions, reward):
        return state._replace(episodes=state.episodes + 1)

    def update(state, key):
        return state._replace(updates=state.updates + 1), {}

    return Agent(init, act, observe, update, width=1, updates=0)


CONSTANT = AgentType("constant", ConstantConfig, lambda config, state, steps: constant_agent(config))
TOY = Method("toy", "a constant action everywhere (test)", KINDS["channels"], STATES["none"], CONSTANT)


@pytest.fixture
def register():
    """register(method, replace=False) for the test; every name it registered is removed afterwards."""
    names = []

    def add(method, replace=False):
        names.append(method.name)
        return register_method(method, replace=replace)

    yield add
    for name in names:
        METHODS.pop(name, None)


@pytest.fixture
def toy(register):
    register(TOY)
    return TOY


def keeps(counts, sizes):
    """What a history record holds for `counts`."""
    return (np.asarray(counts) / sizes).round(4).tolist()


def test_toy_agent_plays_constant_actions_within_the_budget(toy):
    result = search(MODULE, VARIABLES, DATA, method="toy", episodes=3, agent_options={"action": 1.0},
                    progress=False, eval_batch=32)
    env = result.env
    expected = env.policy_counts(np.full(env.steps, 1.0))
    assert len(result.history) == 3
    assert all(h["keep"] == keeps(expected, env.sizes) for h in result.history)
    np.testing.assert_array_equal(result.counts, expected)
    assert env.feasible(result.counts) and result.macs <= 0.5 * result.net.macs * (1 + 1e-6)
    assert (expected < env.sizes).any()  # the wall acted: keeping everything is over budget
    assert int(result.agent_state.episodes) == 3 and int(result.agent_state.updates) == 0


def test_toy_defaults_apply_without_options(toy):
    result = search(MODULE, VARIABLES, DATA, method="toy", episodes=1, progress=False, eval_batch=32, fill=False)
    np.testing.assert_array_equal(result.counts, result.env.policy_counts(np.full(result.env.steps, 0.5)))


def test_unknown_toy_option_names_the_valid_one(toy):
    with pytest.raises(OptionError, match="action") as error:
        search(MODULE, VARIABLES, DATA, method="toy", episodes=1, agent_options={"bogus": 1})
    assert "bogus" in str(error.value) and "\n" not in str(error.value)


def test_toy_through_the_command_line_matches_the_library(toy, capsys, tmp_path):
    status, out, _ = run(capsys, "search", "--help")
    assert status == 0 and "toy:" in out.split()  # the --method help is generated from the registry
    status, out, err = run(capsys, "search", "--workdir", str(BASELINE), "--out", str(tmp_path / "s"),
                           "--method", "toy", "--agent-option", "action=0.25", "--episodes", "2",
                           "--reward-images", "64", "--no-fill")
    assert status == 0, err
    policy = json.loads((tmp_path / "s" / "policy.json").read_text())

    module, variables, _ = load_network(BASELINE)
    images, labels = load_arrays("fashion_mnist", "validation", limit=64)
    library = search(module, variables, (images, labels), method="toy", episodes=2,
                     agent_options={"action": 0.25}, progress=False, fill=False)
    constant = library.env.policy_counts(np.full(library.env.steps, 0.25))
    kept = np.array([step["kept"] for step in policy["steps"]])
    np.testing.assert_array_equal(kept, constant)
    np.testing.assert_array_equal(kept, library.counts)
    assert [step["keep"] for step in policy["steps"]] == [step["keep"] for step in library.policy()["steps"]]
    assert policy["macs"] == library.macs and policy["macs_ratio"] <= 0.5 * (1 + 1e-6)
    assert policy["accuracy"] == pytest.approx(library.accuracy, abs=1e-6)


def test_a_taken_name_is_refused_unless_replaced(toy, register):
    other = TOY._replace(description="another constant")
    with pytest.raises(AgmcError, match="already registered"):
        register(other)
    assert METHODS["toy"] is TOY
    register(other, replace=True)
    assert METHODS["toy"] is other
    builtin = METHODS["random"]
    with pytest.raises(AgmcError, match="already registered"):
        register_method(builtin._replace(description="shadowed"))
    assert METHODS["random"] is builtin


@pytest.mark.parametrize("method", [
    Method("toy_both", "agent and rule", KINDS["channels"], STATES["none"], CONSTANT, rule=lambda env: env.min_counts),
    Method("toy_neither", "no agent, no rule", KINDS["channels"], STATES["none"]),
    Method("toy_stateless", "an agent without a state", KINDS["channels"], agent=CONSTANT),
])
def test_a_method_needs_exactly_one_of_agent_or_rule(register, method):
    with pytest.raises(AgmcError):
        register(method)
    assert method.name not in METHODS


def test_a_rule_registered_here_is_one_scored_policy(register, tmp_path):
    register(Method("toy_rule", "every step at lbound (test)", KINDS["channels"], rule=lambda env: env.min_counts))
    result = search(MODULE, VARIABLES, DATA, method="toy_rule", episodes=5, progress=False, eval_batch=32,
                    out=tmp_path / "s", fill=False)
    np.testing.assert_array_equal(result.counts, result.env.min_counts)
    assert len(result.history) == 1 and result.history[0]["keep"] == keeps(result.env.min_counts, result.env.sizes)
    assert result.reward == pytest.approx(result.accuracy) and result.history[0]["reward"] == result.reward
    assert result.env.feasible(result.counts)
    assert json.loads((tmp_path / "s" / "policy.json").read_text())["macs"] == result.macs
