"""Search speed: episodes per second, and one episode's wall time over one dense evaluation.

All are measured side by side in one run on the same 1000 validation images, after compilation.
Target: episode / dense evaluation <= 1.2 (agent, GNN and masking cost at most 20% extra). With
BatchNorm re-estimation on (the default) the reward's first 100 images pass through the network
computing their statistics, which costs a little more than plain inference; the second ratio
divides by a dense evaluation scored the same way, so it isolates the agent, GNN and masking.

    python experiments/bench_search.py [--model resnet20] [--images 1000] [--episodes 6] [--method agmc]
                                       [--no-recalibrate-bn]
"""
import argparse
import time

import jax
import numpy as np

from agmc_jax.agents import DDPGConfig
from agmc_jax.data import dataset_spec, load_arrays
from agmc_jax.env import EnvConfig, Environment
from agmc_jax.graph import trace
from agmc_jax.models import create_model, init_model
from agmc_jax.search import SearchConfig, _agent, compiled, run_episode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--method", default="agmc")
    parser.add_argument("--gnn-hidden", type=int, default=SearchConfig().gnn_hidden)
    parser.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="BatchNorm re-estimation in the reward (on by default, as in `agmc search`)")
    args = parser.parse_args()

    spec = dataset_spec(args.dataset)
    images, labels = load_arrays(args.dataset, "validation", limit=args.images)
    module = create_model(args.model, spec.num_classes)
    variables = init_model(module, spec.input_shape)
    net = trace(module, variables, spec.input_shape)
    env_config = EnvConfig(target_macs=0.5, recalibrate_bn=args.recalibrate_bn)
    config = SearchConfig(method=args.method, episodes=args.episodes, env=env_config, gnn_hidden=args.gnn_hidden,
                          ddpg=DDPGConfig(warmup_episodes=1))
    env = Environment(net, variables, jax.numpy.asarray(images), jax.numpy.asarray(labels), env_config)
    agent, observe = _agent(args.method, env, net, config)
    key = jax.random.key(0)
    state = agent.init(key, observe(0, env.sizes, np.zeros(env.steps, np.float32)))
    agent = compiled(agent, env.steps)

    batch = env_config.eval_batch
    chunks = jax.numpy.asarray(images[: len(images) // batch * batch]).reshape(-1, batch, *images.shape[1:])
    dense = jax.jit(lambda v, x: jax.lax.map(lambda c: module.apply(v, c, train=False), x))

    dense_reward = jax.jit(lambda v: env._scored_accuracy(v, env.images, env.labels))

    def dense_eval():
        jax.block_until_ready(dense(variables, chunks))

    def dense_reward_eval():
        jax.block_until_ready(dense_reward(variables))

    def episode(state, key):
        act_key, update_key = jax.random.split(key)
        counts, actions, observations = run_episode(env, agent, state, observe, act_key)
        accuracy = float(env.accuracy(counts[None])[0])
        state = agent.observe(state, observations, jax.numpy.asarray(actions), env.reward(accuracy, counts))
        state, _ = agent.update(state, update_key)
        return jax.block_until_ready(state)

    dense_eval()
    dense_reward_eval()
    warm_episodes = max(2, -(-config.ddpg.batch_size // env.steps) + 1)  # compile, fill a batch: updates run
    for warm in range(warm_episodes):
        state = episode(state, jax.random.key(100 + warm))
    episode_times, dense_times, reward_times = [], [], []
    for index in range(args.episodes):
        start = time.perf_counter()
        state = episode(state, jax.random.key(index))
        episode_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        dense_eval()
        dense_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        dense_reward_eval()
        reward_times.append(time.perf_counter() - start)
    episode_s, dense_s, reward_s = (float(np.median(t)) for t in (episode_times, dense_times, reward_times))
    print(f"{args.model} on {args.dataset} {spec.input_shape}, {args.method}, {len(chunks) * batch} reward images, "
          f"{env.steps} steps per episode, "
          f"BatchNorm re-estimation {'on' if args.recalibrate_bn else 'off'}, median of {args.episodes}")
    print(f"episode: {episode_s:.3f} s ({1 / episode_s:.2f} episodes/s); dense evaluation: {dense_s:.3f} s; "
          f"dense evaluation as the reward does it: {reward_s:.3f} s")
    print(f"episode / dense evaluation: {episode_s / dense_s:.2f} (target <= 1.2)")
    print(f"episode / dense evaluation as the reward does it: {episode_s / reward_s:.2f} "
          "(the agent, GNN and masking alone)")


if __name__ == "__main__":
    main()
