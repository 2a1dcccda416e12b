"""The search: a registered method's episodes as compiled chunks, with logging, checkpoints and resume.

Between chunks the host updates the progress bar, appends to `episodes.jsonl` and writes an orbax
checkpoint of the runner and the history, so `resume=True` after a kill loses at most one chunk
and replays it identically.
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from agmc_jax import checkpoint, runs
from agmc_jax.agents import agent_config
from agmc_jax.env import EnvConfig, Environment, check_config
from agmc_jax.errors import AgmcError, CheckpointError, DataError
from agmc_jax.graph import trace
from agmc_jax.kinds import option_names, options_of, typed_options
from agmc_jax.quant import FLOAT_BITS, save_packed
from agmc_jax.search.loop import Runner, compiled, make_chunk, place
from agmc_jax.search.rerank import RERANK_STEPS, Candidate, candidates, rerank
from agmc_jax.search.registry import (METHODS, Method, UnknownMethodError, default_criterion, describe_methods,
                                      get_method, register_method, with_kind)


class SearchConfig(NamedTuple):
    """What to search and how long; `env` holds the budget, `agent` the agent's config (None: its defaults)."""

    method: str = "agmc"
    episodes: int = 100
    seed: int = 0
    env: EnvConfig = EnvConfig()
    agent: Any = None
    gnn_hidden: int = 32  # GCN and LSTM width of the agmc state; the decoder runs in every update, ~ width^2
    chunk: int = 10  # episodes per compiled chunk: the host logs and checkpoints between chunks
    kind: str | None = None  # a compression kind (KINDS) searched instead of the method's own
    rerank: int = 0  # re-rank this many best distinct policies, plus the uniform rule's, by a longer fine-tune
    rerank_steps: int = RERANK_STEPS  # SGD steps of that fine-tune (reward_lr, reward_batch training images a step)


@dataclasses.dataclass
class SearchResult:
    """The best policy found: what each step keeps, its cost and reward, and the networks it makes."""

    env: Environment  # the environment searched: it knows the kind, the network, its variables and the reward data
    counts: np.ndarray  # per step: what the kind counts (channels, weights) kept
    reward: float
    accuracy: float
    history: list
    agent_state: object = None
    candidates: list = dataclasses.field(default_factory=list)  # the re-ranked policies, best first (rerank.Candidate)
    rerank_seconds: float = 0.0  # wall time of the re-rank (compilation included), apart from the search's

    @property
    def net(self):
        return self.env.net

    @property
    def keep(self):
        return self.counts / self.env.sizes

    def _resource(self, name, unchanged):
        """The policy's cost in resource `name`, or `unchanged` when the kind does not change it."""
        return int(round(float(dict(zip(self.env.resources, self.env.cost(self.counts))).get(name, unchanged))))

    @property
    def macs(self):
        return self._resource("macs", self.net.macs)

    @property
    def params(self):
        return self._resource("params", self.net.params)

    @property
    def bits(self):
        """Weight bits per conv/dense layer (name -> bits), pinned layers included; 32 (float32) for kinds that
        do not quantize."""
        widths = getattr(self.env.kind, "bit_widths", None)
        by_path = {} if widths is None else widths(self.counts)
        return {l.name: by_path.get(l.kernel_path, FLOAT_BITS) for l in self.net.layers}

    @property
    def size_bits(self):
        """The model's size in bits: for bit widths, kernels at their bits plus float32 per-channel scales and
        every other variable (the packed file's payload); for other kinds, the exported network's variables in
        float32."""
        if "size" in self.env.resources:
            return self._resource("size", None)
        return FLOAT_BITS * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self.slim()[1]))

    def export(self, path, overwrite: bool = False) -> int:
        """Write the searched bit widths' network to the packed file `path` (kernels as integers of their bits,
        float32 scales and other variables; `agmc_jax.quant.load_packed` reads it); returns the bytes written."""
        if "size" not in self.env.resources:
            raise AgmcError(f"export(path) packs bit widths; a {self.env.kind.unit} search exports with slim() "
                            "(save it with agmc_jax.networks.save_network)")
        variables, widths = self.pruned()
        return save_packed(path, variables, widths, overwrite=overwrite)

    def pruned(self):
        """(variables, masks) of the best policy: the network the search scored, at full size."""
        return self.env.pruned(self.counts)

    def masks(self):
        """The masks of the best policy."""
        return self.pruned()[1]

    def slim(self):
        """(module, variables) of the exported network (physically smaller for channels, sparse for weights)."""
        return self.env.export(self.counts)

    def policy(self):
        """A JSON-ready description of the policy, per step and per layer."""
        kind = self.env.kind
        sizes = ({"size_bits": self.size_bits, **self.env.ratios(self.counts), "bits": self.bits}
                 if "size" in self.env.resources else {})
        return {
            "unit": kind.unit, "macs": self.macs, "params": self.params, "macs_ratio": self.macs / self.net.macs,
            "params_ratio": self.params / self.net.params, **sizes, "reward": self.reward, "accuracy": self.accuracy,
            "steps": [{"index": t, "size": int(size), "kept": int(c), "keep": float(c / size),
                       "layers": [l.name for l in layers]}
                      for t, (size, c, layers) in enumerate(zip(self.env.sizes, self.counts, kind.step_layers))],
            "layers": kind.layer_usage(self.counts),
            **({"rerank": [{"name": c.name, "reward": None if np.isnan(c.reward) else c.reward,
                            "finetuned_top1": c.score, **self.env.ratios(c.counts),
                            "keep": (c.counts / self.env.sizes).round(4).tolist()} for c in self.candidates]}
               if self.candidates else {}),
        }


def _fingerprint(env, config, variables, data, train_data=None):
    options = options_of(env.kind, config.env)  # every option the kind reads, defaults included
    settings = {**config.env._asdict(), "kind_options": [] if options is None else sorted(options._asdict().items())}
    return {"model": type(env.net.module).__name__, "sizes": [int(s) for s in env.sizes], "macs": int(env.net.macs),
            "method": config.method, "kind": config.kind, "seed": config.seed, "env": settings,
            "agent": None if config.agent is None else config.agent._asdict(), "gnn_hidden": config.gnn_hidden,
            "chunk": config.chunk, "variables": checkpoint.digest(variables), "data": checkpoint.digest(data),
            **({"train": checkpoint.digest(train_data)} if env.finetunes else {})}


# How a saved search's fingerprint is compared with a resumed one's (`runs.differences`): an environment field added
# since it was saved at its default, hashes by name, how to keep a saved agent option.
RESUME = {"defaults": {"env": EnvConfig._field_defaults}, "hashed": ("variables", "data", "train"),
          "hints": {"agent": "--agent-option {field}={old} keeps the saved one"}}
MOVED_TO_KIND = ("min_bit", "max_bit", "pinned_bits")  # EnvConfig fields until the bits kind owned them (issue #23)


def saved_fingerprint(meta: dict, fingerprint: dict) -> dict:
    """A saved search's fingerprint as this version writes it: env fields saved before they moved into a kind's
    options become the kind options of those names that this search's kind has (none for a kind without them)."""
    saved = meta.get("env")
    moved = {name: saved[name] for name in MOVED_TO_KIND if name in saved} if isinstance(saved, dict) else {}
    if not moved or "kind_options" in saved:
        return meta
    kept = {name: value for name, value in saved.items() if name not in moved}
    options = [[name, moved[name]] for name, _ in fingerprint["env"].get("kind_options", []) if name in moved]
    return {**meta, "env": {**kept, "kind_options": options}}


def _resume(directory, fingerprint, episodes, target):
    """(finished episodes, state) of the newest readable checkpoint of this search ((0, None) when there is none);
    unreadable newer steps are passed over with one warning and removed: their episodes are played again."""
    def restore(step, meta):
        finished = int(meta.get("finished", 0))
        if finished > episodes:
            raise CheckpointError(f"{directory} holds {finished} finished episodes; --episodes must be at least "
                                  f"{finished} to resume it")
        return finished, checkpoint.restore(directory, step, target=target(finished))

    found = runs.resume(directory, fingerprint, restore, "resume with the saved settings or choose a new --out "
                        "directory", saved=lambda step, meta: saved_fingerprint(meta, fingerprint), **RESUME)
    return (0, None) if found is None else found[2]


class _History:
    """Every finished episode's counts, accuracy and reward, on the host."""

    def __init__(self, steps, finished=0):
        self.counts = np.zeros((finished, steps), np.int32)
        self.accuracies = np.zeros(finished, np.float32)
        self.rewards = np.zeros(finished, np.float32)

    def tree(self):
        return {"counts": self.counts, "accuracies": self.accuracies, "rewards": self.rewards}

    def load(self, tree):
        self.counts, self.accuracies, self.rewards = (np.asarray(tree[k]) for k in ("counts", "accuracies", "rewards"))

    def extend(self, counts, accuracies, rewards):
        self.counts = np.concatenate([self.counts, counts])
        self.accuracies = np.concatenate([self.accuracies, accuracies])
        self.rewards = np.concatenate([self.rewards, rewards])

    def record(self, env, episode):
        """The log line of a finished episode."""
        counts = self.counts[episode]
        return {"episode": episode, "reward": float(self.rewards[episode]), "accuracy": float(self.accuracies[episode]),
                **env.ratios(counts), "best_reward": float(self.rewards[:episode + 1].max()), "keep": (counts / env.sizes).round(4).tolist()}


def build_config(method: Method, episodes, seed, target_macs, target_params, agent_options, env_options,
                 target_size=None, kind=None, rerank=0, rerank_steps=RERANK_STEPS):
    """A `SearchConfig` from the library's keywords: the kind's default budget, the agent's options checked.
    `kind` (a name in KINDS) replaces the method's compression kind; budgets may also come in `env_options`."""
    for name, value in (("episodes", episodes), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise AgmcError(f"{name} must be a whole number, got {value!r}")
    for name, value in (("target_macs", target_macs), ("target_params", target_params), ("target_size", target_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))):
            raise AgmcError(f"{name} must be a fraction in (0, 1), got {value!r}")
    compresses = with_kind(method, kind).kind
    env_options = _gather_kind_options(compresses, {**dict(method.env_defaults), **env_options})
    budget = {"target_macs": target_macs, "target_params": target_params, "target_size": target_size}
    budget = {name: env_options.pop(name, None) if value is None else value for name, value in budget.items()}
    if all(value is None for value in budget.values()):
        budget.update(compresses.default_budget)
    agent = None if method.agent is None else agent_config(method.agent, agent_options, episodes)
    env = EnvConfig(**budget, **env_options)
    check_config(env)
    options_of(compresses, env)
    return _check_lengths(SearchConfig(method=method.name, episodes=episodes, seed=seed, agent=agent, env=env,
                                       kind=kind, rerank=rerank, rerank_steps=rerank_steps))


def _gather_kind_options(kind, options: dict) -> dict:
    """The environment options with the kind's gathered into `kind_options`, sorted (name, value) pairs: given there
    (a dict or pairs) or by name beside the EnvConfig fields (`min_bit=3` for bits, as before the kind owned them);
    a name that is neither is one error listing both."""
    names = option_names(kind)
    unknown = sorted(set(options) - set(EnvConfig._fields) - set(names))
    if unknown:
        takes = f"its options are {', '.join(names)}" if names else "it takes none"
        raise AgmcError(f"unknown environment option {', '.join(unknown)}: neither an EnvConfig field "
                        f"({', '.join(EnvConfig._fields)}) nor an option of the {kind.unit} kind ({takes})")
    given = {**dict(options.get("kind_options", ())), **{name: options[name] for name in names if name in options}}
    rest = {name: value for name, value in options.items() if name not in names}
    return {**rest, "kind_options": tuple(sorted(typed_options(kind, given).items()))}


def _check_lengths(config: SearchConfig) -> SearchConfig:
    """`config`, after checking that it plays at least one episode per chunk and in all."""
    if config.episodes < 1:
        raise AgmcError(f"--episodes must be positive, got {config.episodes}")
    if config.chunk < 1:
        raise AgmcError(f"SearchConfig.chunk (episodes per compiled chunk) must be positive, got {config.chunk}")
    for name in ("rerank", "rerank_steps"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (name == "rerank_steps"):
            raise AgmcError(f"--{name.replace('_', '-')} must be a whole number of at least "
                            f"{int(name == 'rerank_steps')}, got {value!r}")
    return config


def _check_data(data):
    """(images, labels) as arrays, after checking that there is one integer label per image."""
    try:
        images, labels = (np.asarray(a) for a in data)
    except (TypeError, ValueError) as error:
        raise DataError(f"the reward data must be two arrays (images, labels): {error}") from None
    if images.ndim < 2 or images.shape[0] == 0:
        raise DataError(f"the reward data needs at least one image (an array [N, ...]); got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"labels must have shape (N,), one class index per image; got {labels.shape} "
                        "(flatten them: y.reshape(-1))")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"the reward data needs as many labels as images; got {images.shape[0]} images and "
                        f"{labels.shape[0]} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise DataError("the images hold NaN or infinite values; clean or re-normalise them")
    return images, labels


def _check_classes(module, variables, images, labels, call_kwargs):
    """Refuse labels outside [0, the network's number of outputs)."""
    logits = jax.eval_shape(lambda v, x: module.apply(v, x, **call_kwargs), variables, images[:1])
    classes = logits.shape[-1]
    if labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"labels must lie in [0, {classes}) for a network with {classes} outputs; got labels from "
                        f"{labels.min()} to {labels.max()}")


def environment(method: Method, module, variables, data, config: SearchConfig, mesh=None,
                train_data=None) -> Environment:
    """The environment of a search: the network traced, its kind, the reward images (and the training images of a
    reward that finetunes) placed on the mesh."""
    images, labels = _check_data(data)
    net = trace(module, variables, images[:1])
    _check_classes(module, variables, images, labels, net.call_kwargs)
    if train_data is not None:
        train_data = _check_data(train_data)
        _check_classes(module, variables, *train_data, net.call_kwargs)
    return Environment(method.kind(net, config.env), variables, images, labels, config.env, mesh, train_data)


def check_output(out, resume=False) -> None:
    """Refuse an `out` that is a file, that holds a search when not resuming, or that holds other files and no search
    when resuming (a search would start among them); reads nothing else."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; choose a directory for --out")
    if not resume and any((out / name).exists() for name in ("search_state", "episodes.jsonl", "policy.json")):
        raise CheckpointError(f"{out} already holds a search; pass --resume to continue it or choose a new --out")
    other = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) \
        if resume and out.is_dir() and not (out / "search_state").exists() else []
    if other:
        raise CheckpointError(f"{out} holds no search to resume but other files ({', '.join(other[:3])}); give the "
                              "out of an earlier search, or a new out")


def search(module, variables, data, method="agmc", target_macs=None, target_params=None, episodes=100, seed=0,
           out=None, resume=False, progress=True, config: SearchConfig | None = None, agent_options=None,
           ddpg_options=None, mesh=None, kind=None, target_size=None, train_data=None, rerank=0,
           rerank_steps=RERANK_STEPS, **env_options):
    """Search a registered method's policy on labelled arrays `data = (x_val, y_val)`.

    `train_data = (x_train, y_train)` feeds a reward that finetunes (`reward="finetuned"`, `reward_steps=32`):
    each candidate is trained that many steps of `reward_batch` of these images before it is scored. `rerank=K`
    re-scores the K best distinct policies and the uniform rule's with `rerank_steps` steps of that fine-tune on
    `train_data` and returns the best of them (`result.candidates` lists them).
    `kind` ("channels", "weights", "bits") replaces the method's compression kind. The budget defaults
    to the kind's (half the MACs for channels, half the parameters for weights, a quarter of the
    float32 size in bits, `target_size`, for bit widths).
    `agent_options` (or its older name `ddpg_options`) override fields of the agent's config;
    `env_options` those of `EnvConfig` and the kind's options (`kind_options={"max_bit": 6}`, or by name:
    `max_bit=6`). With `out`, writes a checkpoint per chunk, `episodes.jsonl` and `policy.json`; `resume=True`
    continues a killed search there. The reward images are sharded over `mesh` (default: every device on one data
    axis).
    """
    for name, value in (("agent_options", agent_options), ("ddpg_options", ddpg_options),
                        ("kind_options", env_options.get("kind_options"))):
        if value is not None and not isinstance(value, (dict, tuple)):
            raise AgmcError(f"{name} must be a dict of option names and values, got {value!r}")
    if config is None:
        config = build_config(get_method(method), episodes, seed, target_macs, target_params,
                              {**(ddpg_options or {}), **(agent_options or {})}, env_options, target_size, kind,
                              rerank, rerank_steps)
    chosen = with_kind(get_method(config.method), config.kind)
    if chosen.agent is not None and config.agent is None:
        config = config._replace(agent=agent_config(chosen.agent, None, config.episodes))
    _check_lengths(config)
    check_output(out, resume)
    out = None if out is None else Path(out)
    env = environment(chosen, module, variables, data, config, mesh, train_data)
    directory = None if out is None else out.absolute() / "search_state"
    fingerprint = _fingerprint(env, config, variables, data, train_data)
    judge = _judge(chosen, module, variables, data, config, mesh, train_data)
    if chosen.rule is not None:
        return _finish(_rule(env, chosen.rule, directory, fingerprint), out)
    history, agent_state = _run(env, chosen, config, directory, fingerprint, out, progress)
    best = int(np.argmax(history.rewards))
    result = SearchResult(env, history.counts[best].copy(), float(history.rewards[best]),
                          float(history.accuracies[best]), [history.record(env, e) for e in range(len(history.rewards))],
                          agent_state)
    return _finish(_reranked(result, judge, config, history, progress), out)


def _judge(method, module, variables, data, config: SearchConfig, mesh, train_data):
    """The re-ranking environment (the search's, with `rerank_steps` of masked fine-tuning), or None without rerank or
    for a rule (one policy: nothing to choose); built before the search so that missing training data is refused
    before the first episode."""
    if not config.rerank or method.rule is not None:
        return None
    env_config = config.env._replace(reward="finetuned", reward_steps=config.rerank_steps)
    return environment(method, module, variables, data, config._replace(env=env_config), mesh, train_data)


def _reranked(result, judge, config: SearchConfig, history, progress=False):
    """`result` with its policy replaced by the best re-ranked candidate (itself without a judge)."""
    if judge is None:
        return result
    named = candidates(result.env, history.counts, history.rewards, config.rerank)
    if progress and jax.process_index() == 0:
        print(f"agmc: re-ranking {len(named)} policies (the search's best and the uniform rule's) by "
              f"{config.rerank_steps} masked SGD steps each", file=sys.stderr, flush=True)
    began = time.perf_counter()
    ranked = rerank(judge, named)
    best = ranked[0]
    accuracy = float(result.env.accuracy(best.counts[None])[0])
    reward = best.reward if not np.isnan(best.reward) else float(
        result.env.reward(jnp.float32(accuracy), jnp.asarray(best.counts)))
    return dataclasses.replace(result, counts=np.asarray(best.counts), reward=reward, candidates=ranked,
                               accuracy=accuracy, rerank_seconds=time.perf_counter() - began)


def _rule(env, rule, directory, fingerprint):
    """The result of a rule: one policy, scored once; with a directory, saved as a one-episode search so a
    resume checks it like any other."""
    if directory is not None:  # a saved rule is checked like any search, then scored again (it is deterministic)
        _resume(directory, fingerprint, 1, lambda finished: {"history": _History(env.steps, finished).tree()})
    counts = np.asarray(rule(env))
    if env.config.fill:
        counts = np.asarray(jax.jit(env.filled)(jnp.asarray(counts, jnp.int32)))
    accuracy = float(env.accuracy(counts[None])[0])
    reward = float(env.reward(jnp.float32(accuracy), jnp.asarray(counts)))
    history = _History(env.steps)
    history.extend(counts[None].astype(np.int32), np.float32([accuracy]), np.float32([reward]))
    if directory is not None and checkpoint.latest_step(directory) is None:
        checkpoint.save(directory, 1, {"history": history.tree()}, {**fingerprint, "finished": 1})
    return SearchResult(env, counts, reward, accuracy, [history.record(env, 0)])


def _run(env, method, config, directory, fingerprint, out, progress):
    """Play the search chunk by chunk; returns the history and the final agent state."""
    state = method.state(env, config.gnn_hidden)
    agent = method.agent.build(config.agent, state, env.steps)
    key, init_key = jax.random.split(jax.random.key(config.seed))
    runner = Runner(agent.init(init_key, state.example), jnp.zeros((), jnp.int32))
    history = _History(env.steps)
    if directory is not None:
        finished, tree = _resume(directory, fingerprint, config.episodes,
                                 lambda finished: {"runner": runner, "history": _History(env.steps, finished).tree()})
        if tree is not None:
            runner = jax.tree.map(jnp.asarray, tree["runner"])
            history.load(tree["history"])
    runner = place(env, runner)
    limit = jax.device_put(jnp.int32(config.episodes))
    chunk = compiled(make_chunk(env, state, agent, rounds=max(1, -(-config.chunk // agent.width))), runner, key,
                     env.data, limit)
    log = None if out is None else _open_log(out, env, history)
    done = len(history.rewards)
    if progress and done < config.episodes and jax.process_index() == 0:
        print(f"agmc: {config.method} over {env.steps} steps of a network of {env.net.macs / 1e6:.1f}M MACs, "
              f"{env.count} reward images on {env.mesh.devices.size} device(s); compiling (once)", file=sys.stderr,
              flush=True)
    bar = tqdm(initial=done, total=config.episodes, disable=not progress or jax.process_index() != 0, desc=config.method)
    try:
        while done < config.episodes:
            runner, played = chunk(runner, key, env.data, limit)
            finished = int(jax.device_get(runner.episode))
            counts, accuracy, reward = (np.asarray(x).reshape(-1, *np.shape(x)[2:])[:finished - done]
                                        for x in jax.device_get(played))
            history.extend(counts, accuracy, reward)
            records = [history.record(env, e) for e in range(done, finished)]
            done = finished
            bar.update(len(records))
            bar.set_postfix({"best": f"{records[-1]['best_reward']:.4f}",
                             env.resources[0]: f"{records[-1][env.resources[0] + '_ratio']:.3f}"})
            if log is not None:
                log.write("".join(json.dumps(r) + "\n" for r in records))
                log.flush()
            if directory is not None:
                checkpoint.save(directory, done, {"runner": runner, "history": history.tree()},
                                {**fingerprint, "finished": done}, keep=2)
    finally:  # the bar ends its line before an error is printed
        bar.close()
        if log is not None:
            log.close()
    return history, runner.agent


def _open_log(out, env, history):
    """episodes.jsonl rewritten from the checkpoint's finished episodes, open for appending."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "episodes.jsonl"
    checkpoint.write_text(path, "".join(json.dumps(history.record(env, e)) + "\n" for e in range(len(history.rewards))))
    return open(path if jax.process_index() == 0 else os.devnull, "a")  # process 0 writes the outputs


def _finish(result, out):
    """`result`, after writing its policy.json (atomically: a resumed search rewrites it)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(out / "policy.json", json.dumps(result.policy(), indent=1))
    return result


__all__ = ["Candidate", "METHODS", "RERANK_STEPS", "Method", "SearchConfig", "SearchResult", "UnknownMethodError", "build_config",
           "check_output", "default_criterion", "describe_methods", "environment", "get_method", "register_method", "search", "with_kind"]
