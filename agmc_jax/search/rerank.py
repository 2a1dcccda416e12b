"""The second fidelity: the search's best distinct policies and the uniform rule's, scored by a longer fine-tune.

A search screens thousands of policies with a cheap reward; the few it ranks highest, plus the
one-ratio rule's policy at the same budget (raised to it where the search fills), are each trained
`rerank_steps` SGD steps with what they drop kept at zero (one compiled, vmapped call) and scored on
the reward images. The best of them is what the search returns and exports, unless the rule's policy scores
within one standard error of it: then the rule is kept (a gap the reward images cannot resolve is not evidence
against the policy that is most often best, see docs/defaults.md).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agmc_jax.env import Environment

RERANK_STEPS = 128  # SGD steps of each re-ranked candidate's fine-tune


class Candidate(NamedTuple):
    """A re-ranked policy: where it came from, its counts, its search reward and its fine-tuned top-1."""

    name: str
    counts: np.ndarray
    reward: float
    score: float


def distinct_best(counts, rewards, top: int) -> list:
    """Indices of the `top` highest rewards whose policies differ (the first of equal policies kept)."""
    chosen = []
    for index in np.argsort(-np.asarray(rewards), kind="stable"):
        if len(chosen) == top:
            break
        if not any(np.array_equal(counts[index], counts[c]) for c in chosen):
            chosen.append(int(index))
    return chosen


def candidates(env, counts, rewards, top: int) -> list:
    """(name, counts, reward) of the search's `top` distinct best policies and of the uniform rule's."""
    picked = [(f"search #{rank + 1} (episode {index})", np.asarray(counts[index]), float(rewards[index]))
              for rank, index in enumerate(distinct_best(counts, rewards, top))]
    uniform = np.asarray(env.uniform_counts())
    if env.config.fill:
        uniform = np.asarray(jax.jit(env.filled)(jnp.asarray(uniform, jnp.int32)))
    same = [i for i, (_, c, _) in enumerate(picked) if np.array_equal(c, uniform)]
    if same:  # the search found the rule's policy itself
        name, c, reward = picked[same[0]]
        picked[same[0]] = (f"{name} = uniform rule", c, reward)
        return picked
    return picked + [("uniform rule", uniform, float("nan"))]


def rerank(judge: Environment, named) -> list:
    """Every (name, counts, reward) of `named` scored by `judge` (an environment whose reward finetunes) in one
    compiled call, best first (ties keep the given order), the uniform rule's first where `within_noise`."""
    scores = judge.accuracy(np.stack([c for _, c, _ in named]).astype(np.int32))
    ranked = [Candidate(name, counts, reward, float(score)) for (name, counts, reward), score in zip(named, scores)]
    order = sorted(range(len(ranked)), key=lambda i: -ranked[i].score)
    return rule_first(judge.count, [ranked[i] for i in order])


def rule_first(images: int, ranked: list) -> list:
    """`ranked` with the uniform rule's candidate moved first when the best one beats it by at most one standard
    error of the difference of two top-1 rates on `images` images."""
    rule = next((i for i, c in enumerate(ranked) if c.name.endswith("uniform rule")), None)
    if rule is None or rule == 0:
        return ranked
    best, mine = ranked[0].score, ranked[rule].score
    if best - mine <= np.sqrt((best * (1 - best) + mine * (1 - mine)) / images):
        return [ranked[rule]] + ranked[:rule] + ranked[rule + 1:]
    return ranked
