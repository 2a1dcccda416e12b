"""Search speed: a compiled episode against the evaluation it scores, for AGMC and AMC side by side.

Two regimes, measured in one run after compilation (reported apart), each once with the agent
learning (replay buffer full: every episode runs its DDPG updates; PPO trains once per round of
`actors` episodes, so its episode carries a share of that) and once in its warm-up (random
actions: DDPG runs no updates, what the search loop itself costs; PPO still trains its critic):
  (a) ResNet-20 on 1,000 reward images: episode / scored dense evaluation, target <= 1.10. The
      dense evaluation is scored as the reward scores it (BatchNorm re-estimated on the first 100
      images), so the ratio isolates the agent, the GNN, the wall and the masking.
  (b) LeNet-5 on 100 reward images, the accelerator regime where evaluation is nearly free:
      episodes per second, target >= 100, and the agent's overhead per episode in ms.
  (c) the finetuned reward (`--reward finetuned`, issue #22): ResNet-20, random search scoring 4 candidates a round
      side by side (vmapped), each trained `--reward-steps` masked SGD steps of 128 images, then scored on 1,000
      images: seconds per scored candidate against the same number of training steps of the dense network on the
      same batches; the count of compilations over the whole run (target: 1).
  (d) (c) on LeNet-5: the finetuned reward's regime that a CPU finishes (ResNet-20's vmapped in-loop gradients
      take XLA's CPU backend more than 50 CPU-minutes; run (c) on an accelerator).
Chunks and dense evaluations alternate; medians over `--repeats`.

    python experiments/bench_search.py [--chunk 10] [--repeats 5] [--methods agmc,amc,ppo,ppo:bits] [--regimes a,b,c]

On a CPU, run `--regimes a,b,d`.

A method may name another compression kind after a colon (`ppo:bits`: bit widths at a quarter of the
float32 size); each kind is searched under its default budget.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.data import dataset_spec, load_arrays
from agmc_jax.models import create_model, init_model
from agmc_jax.search import build_config, environment, get_method
from agmc_jax.search.registry import with_kind
from agmc_jax.search.loop import Runner, make_chunk, place

from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/

REGIMES = {"a": ("resnet20", 1000), "b": ("lenet5", 100), "c": ("resnet20", 1000), "d": ("lenet5", 1000)}
FINETUNED = ("c", "d")  # the regimes of the finetuned reward


def timed(function, *args):
    """Seconds for one call, waiting for its outputs."""
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def _setup(method, model, images, labels, agent_options, env_options, train=None):
    """(config, env, state, agent, runner, key, limit) of a search of a registered `method` (a Method) on a freshly
    initialised `model`, long enough never to stop."""
    module = create_model(model, 10)
    variables = init_model(module, images.shape[1:])
    config = build_config(method, 10 ** 6, 0, None, None, agent_options, env_options)
    env = environment(method, module, variables, (images, labels), config, train_data=train)
    state = method.state(env, config.gnn_hidden)
    agent = method.agent.build(config.agent, state, env.steps)
    runner = place(env, Runner(agent.init(jax.random.key(1), state.example), jnp.zeros((), jnp.int32)))
    return config, env, state, agent, runner, jax.random.key(0), jax.device_put(jnp.int32(10 ** 6))


def measure(name, model, images, labels, chunk_episodes, repeats, warmup):
    """(compile s, episode s, scored dense evaluation s, steps) for one method on one network; with `warmup` the
    agent stays in its warm-up (random actions, no updates), else its replay buffer is filled first."""
    name, _, kind = name.partition(":")  # e.g. ppo:bits, a method on another compression kind (its default budget)
    method = with_kind(get_method(name), kind or None)
    config, env, state, agent, runner, key, limit = _setup(method, model, images, labels,
                                                           {"warmup_episodes": 10 ** 6 if warmup else 1}, {})
    start = time.perf_counter()
    rounds = -(-chunk_episodes // agent.width)  # a round plays `width` episodes
    play = make_chunk(env, state, agent, rounds=rounds).lower(runner, key, env.data, limit).compile()
    compile_s = time.perf_counter() - start
    full = -(-config.agent.batch_size // env.steps) + 1  # episodes before a batch is in the buffer
    while int(runner.episode) < full:
        runner = play(runner, key, env.data, limit)[0]

    def dense(data):
        logits, dense_variables = env.recalibrated(data, data["kind"]["variables"])
        correct = env._correct(dense_variables, data["images"], data["labels"])
        if logits is not None:
            correct = correct + jnp.sum(jnp.argmax(logits, -1) == data["calibration_labels"])
        return correct / env.count

    dense = jax.jit(dense)
    timed(dense, env.data)
    episodes, evaluations = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        runner = jax.block_until_ready(play(runner, key, env.data, limit)[0])
        episodes.append((time.perf_counter() - start) / (rounds * agent.width))
        evaluations.append(timed(dense, env.data))
    return compile_s, float(np.median(episodes)), float(np.median(evaluations)), env.steps


def measure_finetuned(model, images, labels, train, steps, chunk_episodes, repeats):
    """(compile s, compilations, seconds per scored candidate, seconds of `steps` dense training steps) of a random
    search whose reward finetunes."""
    _, env, state, agent, runner, key, limit = _setup(get_method("random"), model, images, labels, {"candidates": 4},
                                                      {"reward": "finetuned", "reward_steps": steps}, train)
    traces = []
    finetuned = env.finetuned
    env.finetuned = lambda *args: traces.append(1) or finetuned(*args)  # counts the traces: one per compilation
    rounds = -(-chunk_episodes // agent.width)
    chunk = make_chunk(env, state, agent, rounds=rounds)
    start = time.perf_counter()
    runner = jax.block_until_ready(chunk(runner, key, env.data, limit)[0])
    compile_s = time.perf_counter() - start
    sizes = jnp.asarray(env.sizes, jnp.int32)
    dense = jax.jit(lambda data: finetuned(data, sizes, data["kind"]["variables"]))
    timed(dense, env.data)
    candidates, trainings = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        runner = jax.block_until_ready(chunk(runner, key, env.data, limit)[0])
        candidates.append((time.perf_counter() - start) / (rounds * agent.width))
        trainings.append(timed(dense, env.data))
    return compile_s, len(traces), float(np.median(candidates)), float(np.median(trainings))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=10, help="episodes per timed chunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="agmc,amc")
    parser.add_argument("--regimes", default="a,b,c")
    parser.add_argument("--reward-steps", type=int, default=8, help="(c): SGD steps of each candidate's fine-tune")
    args = parser.parse_args()
    spec = dataset_spec("fashion_mnist")
    rows = []  # what experiments/results/bench_search/ keeps of this run
    for regime in args.regimes.split(","):
        model, count = REGIMES[regime]
        images, labels = load_arrays("fashion_mnist", "validation", limit=count)
        if regime in FINETUNED:
            train = load_arrays("fashion_mnist", "train", limit=128 * args.reward_steps)
            compile_s, compilations, candidate_s, dense_s = measure_finetuned(model, images, labels, train,
                                                                              args.reward_steps, args.chunk,
                                                                              args.repeats)
            print(f"({regime}) {model}, finetuned reward, {args.reward_steps} steps of 128 images per candidate, {count} "
                  f"reward images, {jax.device_count()} device(s): {candidate_s:.3f} s per scored candidate, "
                  f"{args.reward_steps} dense training steps {dense_s:.3f} s; ratio {candidate_s / dense_s:.3f}; "
                  f"{compilations} compilation(s) over {1 + args.repeats} chunks (first chunk, compiling, "
                  f"{compile_s:.1f} s)", flush=True)
            rows.append({"regime": regime, "model": model, "method": "random", "phase": f"finetuned reward, "
                         f"{args.reward_steps} steps", "candidate_s": candidate_s, "dense_training_s": dense_s,
                         "ratio": candidate_s / dense_s, "compilations": compilations, "compile_s": compile_s})
            continue
        print(f"({regime}) {model} on Fashion-MNIST {spec.input_shape}, {count} reward images, "
              f"BatchNorm re-estimation on, {jax.device_count()} device(s), median of {args.repeats} chunks of "
              f"{args.chunk} episodes")
        for name, warmup in [(name, warmup) for name in args.methods.split(",") for warmup in (False, True)]:
            compile_s, episode_s, dense_s, steps = measure(name, model, images, labels, args.chunk, args.repeats,
                                                           warmup)
            label = f"{name}, warm-up (random actions)" if warmup else f"{name}, learning"
            line = (f"  {label}: {steps} steps; episode {1000 * episode_s:.2f} ms ({1 / episode_s:.1f} episodes/s), "
                    f"scored dense evaluation {1000 * dense_s:.2f} ms, agent overhead "
                    f"{1000 * (episode_s - dense_s):.2f} ms/episode; ratio {episode_s / dense_s:.3f}; "
                    f"compilation of a chunk {compile_s:.1f} s")
            target = "" if warmup else ("(target ratio <= 1.10)" if regime == "a" else "(target >= 100 episodes/s)")
            print(line, target, flush=True)
            rows.append({"regime": regime, "model": model, "method": name, "phase": "warm-up" if warmup else "learning",
                         "steps": steps, "episode_ms": 1000 * episode_s, "dense_ms": 1000 * dense_s,
                         "ratio": episode_s / dense_s, "episodes_per_s": 1 / episode_s, "compile_s": compile_s})
    write_result("bench_search", time.strftime("%Y-%m-%d_%H%M%S"), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
