"""The compiled search: one compilation per search, no host transfer in a chunk, resume, determinism."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from agmc_jax import checkpoint
from agmc_jax.agents import DDPGConfig, OptionError, agent_config
from agmc_jax.env import BudgetError, EnvConfig, Environment
from agmc_jax.errors import AgmcError, CheckpointError
from agmc_jax.models import create_model, init_model
from agmc_jax.prune.lstsq import refit_systems
from agmc_jax.runs import differences
from agmc_jax.search import METHODS, RESUME, SearchConfig, UnknownMethodError, environment, get_method, search
from agmc_jax.search import checkpoint as search_checkpoint
from agmc_jax.search import loop
from agmc_jax.search.loop import Runner, make_chunk, place
from tests.test_rerank import one_step_short

MODULE = create_model("lenet5", 10)
VARIABLES = init_model(MODULE, (28, 28, 1))
RNG = np.random.default_rng(0)
DATA = (RNG.normal(size=(64, 28, 28, 1)).astype(np.float32), RNG.integers(0, 10, 64).astype(np.int32))
SMALL_DDPG = DDPGConfig(warmup_episodes=2, batch_size=8, replay_size=64)


def config(method, episodes, seed=0, chunk=3, **env):
    agent = SMALL_DDPG if get_method(method).agent is not None and method != "random" else None
    return SearchConfig(method=method, episodes=episodes, seed=seed, gnn_hidden=16, chunk=chunk, agent=agent,
                        env=EnvConfig(target_macs=0.5, eval_batch=32, **env))


@pytest.fixture
def traces(monkeypatch):
    """Counts how often the reward evaluation is traced (i.e. compiled)."""
    count = {"n": 0}
    original = Environment.score

    def counted(self, *args):
        count["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(Environment, "score", counted)
    return count


@pytest.mark.parametrize("method", ["random", "amc"])
def test_one_compilation_whatever_the_number_of_episodes(traces, method):
    search(MODULE, VARIABLES, DATA, config=config(method, 2), progress=False)
    assert traces["n"] == 1
    search(MODULE, VARIABLES, DATA, config=config(method, 11), progress=False)
    assert traces["n"] == 2


@pytest.mark.parametrize("method", ["amc", "annealing"])
def test_one_compilation_across_budgets(method):
    """The budget is an argument of the compiled chunk: three budgets compile once, and a search that reused the
    program plays exactly what a freshly compiled one plays."""
    def searched(macs):
        agent = None if method == "annealing" else SMALL_DDPG
        return search(MODULE, VARIABLES, DATA, config=config(method, 4)._replace(
            agent=agent, env=EnvConfig(target_macs=macs, eval_batch=32)), progress=False)

    loop._programs.clear()
    before = loop.compile_count()
    results = {macs: searched(macs) for macs in (0.7, 0.5, 0.3)}
    assert loop.compile_count() - before == 1
    assert [r.macs / r.net.macs <= macs for macs, r in results.items()] == [True] * 3
    loop._programs.clear()
    fresh = searched(0.5)
    assert loop.compile_count() - before == 2
    assert fresh.history == results[0.5].history


def _chunk(method):
    chosen = get_method(method)
    options = {} if method == "random" else SMALL_DDPG._asdict()
    cfg = config(method, 100)._replace(agent=agent_config(chosen.agent, options))
    env = environment(chosen, MODULE, VARIABLES, DATA, cfg)
    state = chosen.state(env, cfg.gnn_hidden)
    agent = chosen.agent.build(cfg.agent, state, env.steps)
    runner = place(env, Runner(agent.init(jax.random.key(1), state.example), jnp.zeros((), jnp.int32)))
    return env, make_chunk(env, state, agent, rounds=3), runner, agent.width


@pytest.mark.parametrize("method", ["agmc", "random"])
def test_a_chunk_transfers_nothing_to_the_host(method):
    env, chunk, runner, width = _chunk(method)
    key, limit = jax.random.key(0), jax.device_put(jnp.int32(100))
    jax.block_until_ready(chunk(runner, key, env.data, limit))  # compile outside the guard
    with jax.transfer_guard("disallow"):
        runner, played = chunk(runner, key, env.data, limit)
        runner, played = chunk(runner, key, env.data, limit)
    jax.block_until_ready(played)
    assert int(runner.episode) == 6 * width


def test_variables_are_arguments_of_the_evaluation_not_constants(traces):
    env = environment(get_method("random"), MODULE, VARIABLES, DATA, config("random", 1))
    counts = np.array([env.sizes])
    env.accuracy(counts)
    zeroed = {**env.data, "kind": {**env.data["kind"],
                                   "variables": jax.tree.map(jnp.zeros_like, env.data["kind"]["variables"])}}
    after = np.asarray(env._scores(zeroed, jnp.asarray(counts, jnp.int32)))
    assert traces["n"] == 1 and after[0] == pytest.approx(np.mean(DATA[1] == 0))  # all-zero logits: class 0


def test_policies_meet_the_budget_and_best_is_reported():
    result = search(MODULE, VARIABLES, DATA, config=config("amc", 5), progress=False)
    assert result.macs <= 0.5 * result.net.macs * (1 + 1e-6)
    assert len(result.history) == 5
    assert result.reward == max(h["reward"] for h in result.history)
    module, variables = result.slim()
    assert module.apply(variables, DATA[0][:2]).shape == (2, 10)


def test_random_candidates_scored_together_equal_one_at_a_time():
    together = search(MODULE, VARIABLES, DATA, method="random", episodes=6, agent_options={"candidates": 4},
                      progress=False, eval_batch=32)
    alone = search(MODULE, VARIABLES, DATA, method="random", episodes=6, agent_options={"candidates": 1},
                   progress=False, eval_batch=32)
    assert [h["keep"] for h in together.history] == [h["keep"] for h in alone.history]
    np.testing.assert_allclose([h["reward"] for h in together.history], [h["reward"] for h in alone.history],
                               atol=1e-6)


@pytest.mark.parametrize("criterion", ["l2", "lstsq"])
def test_the_reward_scores_the_exported_network(criterion):
    """With lstsq the compiled reward refits the next layers; the slimmed network is that refitted network. One
    episode: both searches export the same policy (with more, which is best depends on the criterion)."""
    result = search(MODULE, VARIABLES, DATA, config=config("random", 1, criterion=criterion, calibration_images=16),
                    progress=False)
    module, variables = result.slim()
    predictions = np.argmax(np.asarray(module.apply(variables, DATA[0])), -1)
    assert result.accuracy == pytest.approx(np.mean(predictions == DATA[1]), abs=1e-6)
    plain = search(MODULE, VARIABLES, DATA, config=config("random", 1, calibration_images=16), progress=False)
    differs = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), variables, plain.slim()[1]))
    assert plain.history[-1]["keep"] == result.history[-1]["keep"]
    assert any(differs) == (criterion == "lstsq")


def test_the_refit_is_fitted_on_every_reward_image():
    """lstsq's systems sum over all the reward images (64 here), not the 16 BatchNorm calibration images: a dense
    layer of n inputs needs more than n images."""
    env = environment(get_method("random"), MODULE, VARIABLES, DATA,
                      config("random", 1, criterion="lstsq", calibration_images=16))
    layers = env.kind._refit_layers
    expected = refit_systems(env.net, VARIABLES, DATA[0], layers)
    assert len(layers) == len(env.data["kind"]["refits"]) >= 3
    for refit, (gram, rhs) in zip(env.data["kind"]["refits"], expected):
        np.testing.assert_allclose(refit["system"][0], gram, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(refit["system"][1], rhs, rtol=1e-5, atol=1e-3)


def test_same_seed_same_search_and_another_seed_another():
    first = search(MODULE, VARIABLES, DATA, config=config("amc", 4, seed=3), progress=False)
    second = search(MODULE, VARIABLES, DATA, config=config("amc", 4, seed=3), progress=False)
    other = search(MODULE, VARIABLES, DATA, config=config("amc", 4, seed=4), progress=False)
    assert first.history == second.history
    assert [h["keep"] for h in first.history] != [h["keep"] for h in other.history]


def test_chunk_length_does_not_change_the_search():
    short = search(MODULE, VARIABLES, DATA, config=config("agmc", 7, chunk=2), progress=False)
    long = search(MODULE, VARIABLES, DATA, config=config("agmc", 7, chunk=5), progress=False)
    assert [h["keep"] for h in short.history] == [h["keep"] for h in long.history]
    np.testing.assert_allclose([h["reward"] for h in short.history], [h["reward"] for h in long.history], atol=1e-6)


class Killed(Exception):
    pass


def test_resume_after_a_kill_gives_the_uninterrupted_history(tmp_path, monkeypatch):
    whole = search(MODULE, VARIABLES, DATA, config=config("amc", 7, chunk=2), out=tmp_path / "whole",
                   progress=False)
    original, calls = search_checkpoint.save, {"n": 0}

    def dies_at_the_second_checkpoint(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(search_checkpoint, "save", dies_at_the_second_checkpoint)
    with pytest.raises(Killed):
        search(MODULE, VARIABLES, DATA, config=config("amc", 7, chunk=2), out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(search_checkpoint, "save", original)
    assert checkpoint.latest_step(tmp_path / "cut" / "search_state") == 2
    with pytest.raises(CheckpointError, match="--resume"):
        search(MODULE, VARIABLES, DATA, config=config("amc", 7, chunk=2), out=tmp_path / "cut", progress=False)
    resumed = search(MODULE, VARIABLES, DATA, config=config("amc", 7, chunk=2), out=tmp_path / "cut", resume=True,
                     progress=False)
    assert resumed.history == whole.history
    assert (tmp_path / "cut" / "episodes.jsonl").read_text() == (tmp_path / "whole" / "episodes.jsonl").read_text()


def test_a_finished_search_resumes_to_more_episodes(tmp_path):
    search(MODULE, VARIABLES, DATA, config=config("amc", 4, chunk=2), out=tmp_path / "s", progress=False)
    longer = search(MODULE, VARIABLES, DATA, config=config("amc", 6, chunk=2), out=tmp_path / "s", resume=True,
                    progress=False)
    whole = search(MODULE, VARIABLES, DATA, config=config("amc", 6, chunk=2), progress=False)
    assert longer.history == whole.history


def test_resume_refuses_another_network_other_weights_or_other_data(tmp_path):
    search(MODULE, VARIABLES, DATA, config=config("amc", 2), out=tmp_path / "s", progress=False)
    other = create_model("lenet5", 7)
    with pytest.raises(CheckpointError, match="another network"):
        search(other, init_model(other, (28, 28, 1)), (DATA[0], DATA[1] % 7), config=config("amc", 4),
               out=tmp_path / "s", resume=True, progress=False)
    retrained = jax.tree.map(lambda v: v * 1.01, VARIABLES)
    with pytest.raises(CheckpointError, match="variables"):
        search(MODULE, retrained, DATA, config=config("amc", 4), out=tmp_path / "s", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="data"):
        search(MODULE, VARIABLES, (DATA[0][:32], DATA[1][:32]), config=config("amc", 4), out=tmp_path / "s",
               resume=True, progress=False)


def test_agent_options_reach_the_agent_and_resume_checks_them(tmp_path):
    search(MODULE, VARIABLES, DATA, method="amc", episodes=2, ddpg_options={"sigma_decay": 0.5}, out=tmp_path / "s",
           progress=False)
    assert checkpoint.metadata(tmp_path / "s" / "search_state")["agent"]["sigma_decay"] == 0.5
    with pytest.raises(CheckpointError, match="agent"):
        search(MODULE, VARIABLES, DATA, method="amc", episodes=3, agent_options={"sigma_decay": 0.9},
               out=tmp_path / "s", resume=True, progress=False)


def test_unknown_agent_option_names_the_valid_ones():
    with pytest.raises(OptionError, match="sigma_decay") as error:
        search(MODULE, VARIABLES, DATA, method="amc", episodes=2, agent_options={"sigma_dcay": 0.5})
    assert "\n" not in str(error.value)
    with pytest.raises(OptionError, match="candidates"):
        search(MODULE, VARIABLES, DATA, method="random", episodes=2, agent_options={"sigma_decay": 0.5})
    with pytest.raises(OptionError, match="takes"):
        search(MODULE, VARIABLES, DATA, method="amc", episodes=2, agent_options={"batch_size": "many"})


def test_agmc_trains_its_graph_encoder():
    """Target networks start equal to the online ones and trail them by tau: a gap means training moved them."""
    state = search(MODULE, VARIABLES, DATA, config=config("agmc", 5), progress=False).agent_state
    for online, target in ((state.actor_params, state.target_actor_params),
                           (state.critic_params, state.target_critic_params)):
        encoder, trailing = online["params"]["encoder"], target["params"]["encoder"]
        gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), encoder, trailing))
        assert len(gaps) > 4 and max(gaps) > 0


# Every method with the reward that reads the resource (acc_flops), plain accuracy once, and acc_norm on each
# resource (MACs, sparse MACs, size in bits): each pair compiles a search of its own, so not the whole product.
@pytest.mark.parametrize("method, reward", [(m, "acc_flops") for m in sorted(METHODS)] + [("amc", "acc")] + [
    (m, "acc_norm") for m in ("amc", "fg", "haq")])
def test_every_method_with_every_reward(method, reward, tmp_path):
    unit = get_method(method).kind.unit
    target = {"weights": {"target_params": 0.5}, "bits": {"target_size": 0.2}}.get(unit, {"target_macs": 0.5})
    result = search(MODULE, VARIABLES, DATA, method=method, episodes=3, progress=False, out=tmp_path / "s",
                    reward=reward, eval_batch=32, ddpg_options={"warmup_episodes": 1, "batch_size": 4}
                    if getattr(get_method(method).agent, "name", None) == "ddpg" else None, **target)
    resource = float(result.env.cost(result.counts)[0])
    assert result.env.feasible(result.counts)
    if "target_macs" in target:
        assert resource <= 0.5 * result.net.macs * (1 + 1e-6)
    low, high = result.env.bounds
    expected = {"acc": result.accuracy, "acc_flops": -(1 - result.accuracy) * np.log(resource),
                "acc_norm": (result.accuracy + np.clip((high - resource) / max(high - low, 1.0), 0, 1)) / 2}[reward]
    assert result.reward == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (tmp_path / "s" / "policy.json").exists()
    assert one_step_short(result.env, result.counts)  # every method uses the whole budget (fill, the default)


def test_bad_method_budget_and_episodes():
    with pytest.raises(UnknownMethodError, match="unknown method"):
        search(MODULE, VARIABLES, DATA, method="ppo2")
    with pytest.raises(BudgetError):
        search(MODULE, VARIABLES, DATA, method="random", target_macs=1.5)
    for episodes in (0, -1):
        with pytest.raises(AgmcError, match="episodes"):
            search(MODULE, VARIABLES, DATA, method="random", episodes=episodes)


def test_out_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file"):
        search(MODULE, VARIABLES, DATA, method="random", episodes=1, out=path, progress=False)
    assert path.read_text() == "keep me"


def test_a_search_saved_before_an_environment_field_existed_resumes_with_its_default(tmp_path):
    """Fingerprints compare a field the saved one lacks (e.g. `fill`, added later) as its default."""
    search(MODULE, VARIABLES, DATA, config=config("amc", 2), out=tmp_path / "s", progress=False)
    now = checkpoint.metadata(tmp_path / "s" / "search_state")
    older = {**now, "env": {k: v for k, v in now["env"].items() if k != "fill"}}
    assert differences(older, now, **RESUME) == []
    assert differences({**now, "env": {**now["env"], "fill": False}}, now, **RESUME) == ["env.fill False -> True"]


def test_a_bfloat16_reward_scores_like_float32_and_exports_float32():
    """`reward_dtype="bfloat16"` computes the reward's evaluation in bfloat16: on the trained LeNet-5 the policies
    score within a few images of float32, the walled counts do not change, the exported variables stay float32."""
    from agmc_jax.data import load_arrays
    from agmc_jax.train import load_trained

    module, variables, _ = load_trained(Path(__file__).parents[1] / "agmc_jax/baselines/lenet5_fashion_mnist")
    data = load_arrays("fashion_mnist", "validation", limit=400)
    method = get_method("random")
    envs = [environment(method, module, variables, data, SearchConfig(env=EnvConfig(target_macs=0.8, reward_dtype=d)))
            for d in ("float32", "bfloat16")]
    actions = np.random.default_rng(0).uniform(size=(6, envs[0].steps))
    counts = np.stack([envs[0].policy_counts(a) for a in actions])
    assert np.array_equal(counts, np.stack([envs[1].policy_counts(a) for a in actions]))
    full, half = (env.accuracy(counts) for env in envs)
    assert full.max() > 0.5 and np.abs(full - half).max() <= 0.02
    exported = envs[1].pruned(counts[0])[0]
    assert {leaf.dtype for leaf in jax.tree.leaves(exported)} == {np.dtype(np.float32)}
    with pytest.raises(BudgetError, match="reward-dtype"):
        environment(method, module, variables, data, SearchConfig(env=EnvConfig(target_macs=0.5, reward_dtype="float8")))


def test_resuming_into_a_directory_of_other_files_is_refused(tmp_path):
    """The library's `search(out=..., resume=True)` on a directory that holds files but no search (a training
    workdir, say) is one line and writes nothing there."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no search to resume but other files \\(config.json\\)"):
        search(MODULE, VARIABLES, DATA, method="random", episodes=1, out=tmp_path / "w", resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["config.json"]
