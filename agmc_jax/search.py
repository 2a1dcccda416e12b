"""The search: episodes of an agent (or a rule) choosing keep ratios, with logging and resume.

Methods: `agmc` (GNN encoder-decoder states + DDPG), `amc` (rule-based states + DDPG), `random`
(random policies through the same action wall), `uniform` (one ratio everywhere), all choosing
channels per group, and `fg` (AGMC's agent choosing the weight sparsity of each layer). The reward
evaluation is compiled once per search; the whole search state is checkpointed with orbax after
every episode, so `resume=True` after a kill loses no finished episode.
"""
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from agmc_jax import checkpoint
from agmc_jax.agents import DDPGConfig, ddpg, random_agent
from agmc_jax.embed import AMCActor, AMCCritic, make_agmc_networks
from agmc_jax.env import EnvConfig, Environment
from agmc_jax.errors import AgmcError, CheckpointError
from agmc_jax.fine_grained import FineGrainedEnvironment
from agmc_jax.graph import trace

METHODS = ("agmc", "amc", "random", "uniform", "fg")


class UnknownMethodError(AgmcError, ValueError):
    """A search method that does not exist."""


class SearchConfig(NamedTuple):
    """What to search and how long; `env` holds the budget, `ddpg` the agent's settings."""

    method: str = "agmc"
    episodes: int = 100
    seed: int = 0
    env: EnvConfig = EnvConfig()
    ddpg: DDPGConfig = DDPGConfig()
    gnn_hidden: int = 32  # GCN and LSTM width; the decoder runs in every DDPG update, at a cost ~ width^2
    checkpoint_every: int = 1
    candidates: int = 4  # random search: policies scored per compiled call (DDPG methods learn from each one)


@dataclasses.dataclass
class SearchResult:
    """The best policy found: what each step keeps, its cost and reward, and the networks it makes."""

    env: object  # the Environment searched: it knows the network, its variables and the reward data
    counts: np.ndarray  # per step: channels (or, for `fg`, weights) kept
    reward: float
    accuracy: float
    history: list
    agent_state: object = None

    @property
    def net(self):
        return self.env.net

    @property
    def variables(self):
        return self.env.variables

    @property
    def keep(self):
        return self.counts / self.env.sizes

    @property
    def macs(self):
        return int(round(self.env.cost(self.counts)["macs"]))

    @property
    def params(self):
        return int(round(self.env.cost(self.counts)["params"]))

    def pruned(self):
        """(variables, masks) of the best policy: the network the search scored, at full size."""
        return self.env.pruned(self.counts)

    def masks(self):
        """The masks of the best policy."""
        return self.pruned()[1]

    def slim(self):
        """(module, variables) of the physically smaller network (for `fg`: the sparse one)."""
        return self.env.export(*self.pruned())

    def policy(self):
        """A JSON-ready description of the policy, per step and per layer."""
        return {
            "unit": self.env.unit, "macs": self.macs, "params": self.params, "macs_ratio": self.macs / self.net.macs,
            "params_ratio": self.params / self.net.params, "reward": self.reward, "accuracy": self.accuracy,
            "steps": [{"index": t, "size": int(size), "kept": int(c), "keep": float(c / size),
                       "layers": [l.name for l in layers]}
                      for t, (size, c, layers) in enumerate(zip(self.env.sizes, self.counts, self.env.step_layers))],
            "layers": self.env.layer_usage(self.counts),
        }


def _agent(method, env, net, config):
    """The agent and a function mapping (step, counts, applied actions) to its observation."""
    if method == "random":
        return random_agent(), lambda t, counts, actions: np.zeros((), np.float32)
    if method in ("agmc", "fg"):
        actor, critic, _ = make_agmc_networks(net, hidden=config.gnn_hidden, unit=env.unit)

        def observe(t, counts, actions):
            return {"t": np.int32(t), "actions": np.where(np.arange(env.steps) < t, actions, 0).astype(np.float32)}

        return ddpg(actor, critic, config.ddpg), observe
    static = env.amc_features()

    def observe(t, counts, actions):
        return env.amc_state(static, t, counts, actions[t - 1] if t > 0 else 1.0)

    return ddpg(AMCActor(), AMCCritic(), config.ddpg), observe


class _Run:
    """The mutable loop state of a search, checkpointed as one pytree."""

    def __init__(self, agent_state, key, steps, episodes):
        self.agent_state, self.key, self.episode = agent_state, key, 0
        self.counts = np.zeros((episodes, steps), np.int32)
        self.rewards = np.full(episodes, -np.inf, np.float32)
        self.accuracies = np.zeros(episodes, np.float32)

    def tree(self):
        return {"agent": self.agent_state, "key": jax.random.key_data(self.key), "episode": np.int32(self.episode),
                "counts": self.counts, "rewards": self.rewards, "accuracies": self.accuracies}

    def load(self, tree):
        self.agent_state, self.key = tree["agent"], jax.random.wrap_key_data(tree["key"])
        self.episode = int(tree["episode"])
        self.counts, self.rewards = np.array(tree["counts"]), np.array(tree["rewards"])
        self.accuracies = np.array(tree["accuracies"])


def _fingerprint(net, config):
    return {"model": type(net.module).__name__, "group_sizes": [int(s) for s in net.group_sizes],
            "macs": int(net.macs), "method": config.method, "episodes": config.episodes, "seed": config.seed,
            "env": config.env._asdict(), "ddpg": config.ddpg._asdict()}


def _check_resume(directory, fingerprint):
    saved = checkpoint.metadata(directory)
    changed = [k for k in fingerprint if k != "episodes" and saved.get(k) != json.loads(json.dumps(fingerprint[k]))]
    if changed:
        raise CheckpointError(f"{directory} holds a search of another network or setting ({', '.join(changed)} "
                              "differ); choose a new --out directory")


def run_episode(env, agent, agent_state, observe, key, explore=True):
    """One episode: the agent acts step by step through the action wall; returns what it saw and did."""
    counts = np.array(env.sizes, copy=True)
    actions = np.zeros(env.steps, np.float32)
    observations = []
    for t in range(env.steps):
        obs = observe(t, counts, actions)
        key, step_key = jax.random.split(key)
        action = float(agent.act(agent_state, obs, step_key, jnp.asarray(explore)))
        counts[t] = env.ratio_to_count(t, float(env.action_to_ratio(action)), counts)
        actions[t] = env.ratio_to_action(counts[t] / env.sizes[t])
        observations.append(obs)
    return counts, actions, jax.tree.map(lambda *x: np.stack(x), *observations)


def _play(env, agent, observe, run, episodes, width):
    """Play `episodes` (at most `width`), score them in one compiled call, then let the agent learn from each
    in turn; yields each episode's record once `run` holds it."""
    played = []
    for _ in episodes:
        run.key, act_key, update_key = jax.random.split(run.key, 3)
        played.append((*run_episode(env, agent, run.agent_state, observe, act_key), update_key))
    batch = np.stack([counts for counts, *_ in played])
    padded = np.concatenate([batch, np.repeat(batch[-1:], width - len(batch), axis=0)])
    accuracies = env.accuracy(padded)[:len(batch)]  # one batch size: compiled once
    for episode, (counts, actions, observations, update_key), accuracy in zip(episodes, played, accuracies):
        reward = env.reward(accuracy, counts)
        run.agent_state = agent.observe(run.agent_state, observations, jnp.asarray(actions), jnp.float32(reward))
        run.agent_state, _ = agent.update(run.agent_state, update_key)
        run.counts[episode], run.rewards[episode], run.accuracies[episode] = counts, reward, accuracy
        run.episode = episode + 1
        yield _record(env, run, episode)


def search(module, variables, data, method="agmc", target_macs=None, target_params=None, episodes=100, seed=0,
           out=None, resume=False, progress=True, config: SearchConfig | None = None, ddpg_options=None,
           **env_options):
    """Search keep ratios per channel group (per layer's weights for `fg`) on labelled arrays `data = (x_val, y_val)`.

    The budget defaults to half the MACs (half the parameters for `fg`).

    Works for any network `agmc_jax.trace` handles. With `out`, writes a checkpoint per episode,
    `episodes.jsonl` and the best policy; `resume=True` continues a killed search there.
    `ddpg_options` override `DDPGConfig` fields (e.g. `{"sigma_decay": 0.99}`); `env_options` `EnvConfig` ones.
    """
    if method not in METHODS:
        raise UnknownMethodError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if target_macs is None and target_params is None:  # fg prunes weights: its natural budget is parameters
        target_params, target_macs = (0.5, None) if method == "fg" else (None, 0.5)
    if config is None:  # AMC warms up for 100 of its 400+ episodes; shorter searches keep that quarter
        config = SearchConfig(method=method, episodes=episodes, seed=seed,
                              env=EnvConfig(target_macs=target_macs, target_params=target_params, **env_options),
                              ddpg=DDPGConfig(**{"warmup_episodes": min(100, max(1, episodes // 4)),
                                                 **(ddpg_options or {})}))
    images, labels = (np.asarray(a) for a in data)
    net = trace(module, variables, images[:1])
    environment = FineGrainedEnvironment if config.method == "fg" else Environment
    env = environment(net, variables, jnp.asarray(images), jnp.asarray(labels), config.env)
    if config.method == "uniform":
        counts = env.uniform_counts()
        accuracy = float(env.accuracy(counts[None])[0])
        reward = env.reward(accuracy, counts)
        history = [{"episode": 0, "reward": reward, "accuracy": accuracy, "macs_ratio": env.cost(counts)["macs"] / net.macs}]
        return _finish(SearchResult(env, counts, reward, accuracy, history), out)
    agent, observe = _agent(config.method, env, net, config)
    key = jax.random.key(config.seed)
    key, init_key = jax.random.split(key)
    run = _Run(agent.init(init_key, observe(0, env.sizes, np.zeros(env.steps, np.float32))), key, env.steps,
               config.episodes)
    directory = None if out is None else Path(out).absolute() / "search_state"
    fingerprint = _fingerprint(net, config)
    if directory is not None and checkpoint.latest_step(directory) is not None:
        if not resume:
            raise CheckpointError(f"{out} already holds a search; pass --resume to continue it or choose a new --out")
        _check_resume(directory, fingerprint)
        run.load(checkpoint.restore(directory, target=run.tree()))
    agent = compiled(agent, config.ddpg.updates_per_episode or env.steps)
    log = None if out is None else _open_log(Path(out), env, run)
    bar = tqdm(initial=run.episode, total=config.episodes, disable=not progress, desc=config.method)
    width = config.candidates if config.method == "random" else 1
    for first in range(run.episode, config.episodes, width):
        for record in _play(env, agent, observe, run, range(first, min(first + width, config.episodes)), width):
            bar.update()
            bar.set_postfix(best=f"{record['best_reward']:.4f}", macs=f"{record['macs_ratio']:.3f}")
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
        if directory is not None and (run.episode % config.checkpoint_every < width or run.episode == config.episodes):
            checkpoint.save(directory, run.episode, run.tree(), fingerprint, keep=2)
    bar.close()
    if log is not None:
        log.close()
    best = int(np.argmax(run.rewards[:run.episode]))
    history = [_record(env, run, e) for e in range(run.episode)]
    result = SearchResult(env, run.counts[best].copy(), float(run.rewards[best]), float(run.accuracies[best]),
                          history, run.agent_state)
    return _finish(result, out)


def compiled(agent, updates_per_episode):
    """The agent with `act` and `observe` jit-compiled and `update` doing one episode's updates in one call."""
    def many(state, key):
        return jax.lax.scan(agent.update, state, jax.random.split(key, updates_per_episode))
    return agent._replace(act=jax.jit(agent.act), observe=jax.jit(agent.observe), update=jax.jit(many))


def _record(env, run, episode):
    """The log line of a finished episode, derived from the checkpointed arrays."""
    counts = run.counts[episode]
    cost = env.cost(counts)
    return {"episode": episode, "reward": float(run.rewards[episode]), "accuracy": float(run.accuracies[episode]),
            "macs_ratio": cost["macs"] / env.net.macs, "params_ratio": cost["params"] / env.net.params,
            "best_reward": float(run.rewards[:episode + 1].max()), "keep": (counts / env.sizes).round(4).tolist()}


def _open_log(out, env, run):
    """episodes.jsonl rewritten from the checkpoint's finished episodes, open for appending."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "episodes.jsonl"
    path.write_text("".join(json.dumps(_record(env, run, e)) + "\n" for e in range(run.episode)))
    return open(path, "a")


def _finish(result, out):
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "policy.json").write_text(json.dumps(result.policy(), indent=1))
    return result
