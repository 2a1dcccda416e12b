"""The search loop: one compilation per search, resume after a kill, determinism, training the encoder."""
import jax
import numpy as np
import pytest

from agmc_jax import checkpoint
from agmc_jax.agents import DDPGConfig
from agmc_jax.env import BudgetError, EnvConfig, Environment
from agmc_jax.errors import CheckpointError
from agmc_jax.models import create_model, init_model
from agmc_jax.prune import prune_counts
from agmc_jax.search import SearchConfig, UnknownMethodError, search

MODULE = create_model("lenet5", 10)
VARIABLES = init_model(MODULE, (28, 28, 1))
RNG = np.random.default_rng(0)
DATA = (RNG.normal(size=(64, 28, 28, 1)).astype(np.float32), RNG.integers(0, 10, 64).astype(np.int32))


def config(method, episodes, seed=0):
    return SearchConfig(method=method, episodes=episodes, seed=seed, gnn_hidden=16,
                        env=EnvConfig(target_macs=0.5, eval_batch=32),
                        ddpg=DDPGConfig(warmup_episodes=2, batch_size=8, replay_size=64))


@pytest.fixture
def traces(monkeypatch):
    """Counts how often the reward evaluation is traced (i.e. compiled)."""
    count = {"n": 0}
    original = Environment._scored_accuracy

    def counted(self, *args):
        count["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(Environment, "_scored_accuracy", counted)
    return count


def test_reward_evaluation_compiles_once_whatever_the_number_of_episodes(traces):
    search(MODULE, VARIABLES, DATA, config=config("random", 2), progress=False)
    assert traces["n"] == 1
    search(MODULE, VARIABLES, DATA, config=config("random", 7), progress=False)
    assert traces["n"] == 2


def test_policies_meet_the_budget_and_best_is_reported():
    result = search(MODULE, VARIABLES, DATA, config=config("amc", 5), progress=False)
    assert result.macs <= 0.5 * result.net.macs
    assert len(result.history) == 5
    assert result.reward == max(h["reward"] for h in result.history)
    module, variables = result.slim()
    assert module.apply(variables, DATA[0][:2]).shape == (2, 10)


def test_random_candidates_scored_together_equal_one_at_a_time():
    together = search(MODULE, VARIABLES, DATA, config=config("random", 6)._replace(candidates=4), progress=False)
    alone = search(MODULE, VARIABLES, DATA, config=config("random", 6)._replace(candidates=1), progress=False)
    assert [h["keep"] for h in together.history] == [h["keep"] for h in alone.history]
    np.testing.assert_allclose([h["reward"] for h in together.history], [h["reward"] for h in alone.history],
                               atol=1e-6)


@pytest.mark.parametrize("criterion", ["l2", "lstsq"])
def test_the_reward_scores_the_exported_network(criterion):
    """With lstsq the reward refits the next layers; the slimmed network is that refitted network."""
    env = EnvConfig(target_macs=0.5, eval_batch=32, criterion=criterion, calibration_images=16)
    result = search(MODULE, VARIABLES, DATA, config=config("random", 2)._replace(env=env), progress=False)
    module, variables = result.slim()
    predictions = np.argmax(np.asarray(module.apply(variables, DATA[0])), -1)
    assert result.accuracy == pytest.approx(np.mean(predictions == DATA[1]), abs=1e-6)
    plain = result.net.slim(*prune_counts(result.net, VARIABLES, result.counts, "l2"))[1]
    differs = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), variables, plain))
    assert any(differs) == (criterion == "lstsq")


def test_same_seed_same_search():
    first = search(MODULE, VARIABLES, DATA, config=config("amc", 4, seed=3), progress=False)
    second = search(MODULE, VARIABLES, DATA, config=config("amc", 4, seed=3), progress=False)
    assert [h["keep"] for h in first.history] == [h["keep"] for h in second.history]
    assert [h["reward"] for h in first.history] == [h["reward"] for h in second.history]


class Killed(Exception):
    pass


def test_resume_after_a_kill_loses_no_episode(tmp_path, monkeypatch):
    whole = search(MODULE, VARIABLES, DATA, config=config("amc", 6), out=tmp_path / "whole", progress=False)
    original, calls = Environment.reward, {"n": 0}

    def dies_in_episode_four(self, accuracy, counts):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return original(self, accuracy, counts)

    monkeypatch.setattr(Environment, "reward", dies_in_episode_four)
    with pytest.raises(Killed):
        search(MODULE, VARIABLES, DATA, config=config("amc", 6), out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(Environment, "reward", original)
    log = (tmp_path / "cut" / "episodes.jsonl").read_text().splitlines()
    assert len(log) == 3
    with pytest.raises(CheckpointError, match="--resume"):
        search(MODULE, VARIABLES, DATA, config=config("amc", 6), out=tmp_path / "cut", progress=False)
    resumed = search(MODULE, VARIABLES, DATA, config=config("amc", 6), out=tmp_path / "cut", resume=True,
                     progress=False)
    assert [h["keep"] for h in resumed.history] == [h["keep"] for h in whole.history]
    assert [h["reward"] for h in resumed.history] == [h["reward"] for h in whole.history]
    assert len((tmp_path / "cut" / "episodes.jsonl").read_text().splitlines()) == 6


def test_resume_refuses_another_network(tmp_path):
    search(MODULE, VARIABLES, DATA, config=config("amc", 2), out=tmp_path / "s", progress=False)
    other = create_model("lenet5", 7)
    with pytest.raises(CheckpointError, match="another network"):
        search(other, init_model(other, (28, 28, 1)), (DATA[0], DATA[1] % 7), config=config("amc", 4),
               out=tmp_path / "s", resume=True, progress=False)


def test_ddpg_options_reach_the_agent_and_resume_checks_them(tmp_path):
    search(MODULE, VARIABLES, DATA, method="amc", episodes=2, ddpg_options={"sigma_decay": 0.5}, out=tmp_path / "s",
           progress=False)
    assert checkpoint.metadata(tmp_path / "s" / "search_state")["ddpg"]["sigma_decay"] == 0.5
    with pytest.raises(CheckpointError, match="ddpg"):
        search(MODULE, VARIABLES, DATA, method="amc", episodes=3, ddpg_options={"sigma_decay": 0.9},
               out=tmp_path / "s", resume=True, progress=False)


def test_agmc_trains_its_graph_encoder():
    """Target networks start equal to the online ones and trail them by tau: a gap means training moved them."""
    state = search(MODULE, VARIABLES, DATA, config=config("agmc", 5), progress=False).agent_state
    for online, target in ((state.actor_params, state.target_actor_params),
                           (state.critic_params, state.target_critic_params)):
        encoder, trailing = online["params"]["encoder_decoder"], target["params"]["encoder_decoder"]
        gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), encoder, trailing))
        assert len(gaps) > 4 and max(gaps) > 0


def test_bad_method_and_budget():
    with pytest.raises(UnknownMethodError, match="unknown method"):
        search(MODULE, VARIABLES, DATA, method="ppo2")
    with pytest.raises(BudgetError):
        search(MODULE, VARIABLES, DATA, method="random", target_macs=1.5)
