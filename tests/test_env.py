"""The budget and its compiled action wall: every finished policy meets the budget, on every zoo network,
with the counts of a plain NumPy wall."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from agmc_jax.embed import amc_features, amc_state
from agmc_jax.env import Budget, BudgetError, EnvConfig, rounded_counts
from agmc_jax.graph import trace
from agmc_jax.kinds import Channels
from agmc_jax.models import MODELS, create_model

SMALL_INPUTS = {"lenet5": (28, 28, 1), "vgg16": (32, 32, 3), "mobilenet_v1": (32, 32, 3),
                "mobilenet_v2": (32, 32, 3), "resnet18": (32, 32, 3), "resnet50": (32, 32, 3)}


def traced(name):
    module = create_model(name, 10)
    shape = SMALL_INPUTS.get(name, (16, 16, 3))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, *shape), np.float32)))
    return trace(module, variables, shape)


NETS = {name: traced(name) for name in MODELS}


def budget(net, **options):
    config = EnvConfig(**options)
    return Budget(Channels(net, config), config)


def multiple(b, t):
    """The multiple step t rounds to: round_to, or by default 8 for groups of 16 channels and more, else 1."""
    if b.config.round_to is not None:
        return b.config.round_to
    return 8 if b.sizes[t] >= 16 else 1


def numpy_wall(b, actions):
    """AMC's wall in float64 NumPy, step by step: scale, floor, round down, cap by bisection, clip."""
    def floor(count, t):
        step, size = multiple(b, t), b.sizes[t]
        return int(min(size, max(step, count // step * step))) if step > 1 else int(count)

    def fits(counts):
        macs, params = b.net.cost(counts)
        return macs <= b.targets[0] * (1 + 1e-9) and params <= b.targets[1] * (1 + 1e-9)

    counts = np.array(b.sizes)
    for t, action in enumerate(actions):
        ratio = b.config.lbound + np.clip(action, 0, 1) * (b.config.rbound - b.config.lbound)
        trial = counts.copy()
        trial[t + 1:] = b.min_counts[t + 1:]
        low, high = int(b.min_counts[t]), int(b.sizes[t])
        while low < high:
            trial[t] = (low + high + 1) // 2
            low, high = (trial[t], high) if fits(trial) else (low, trial[t] - 1)
        cap = max(floor(low, t), int(b.min_counts[t]))
        counts[t] = np.clip(floor(int(np.floor(ratio * b.sizes[t] + 1e-4)), t), b.min_counts[t], cap)
    return counts


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_finished_policy_meets_macs_budget_with_the_counts_of_the_numpy_wall(name, data):
    net = NETS[name]
    target = data.draw(st.floats(0.3, 0.9), label="target")
    round_to = data.draw(st.sampled_from([1, 8, None]), label="round_to")
    try:
        b = budget(net, target_macs=target, round_to=round_to)
    except BudgetError:  # rounding to 8 can make lbound's policy too big: then that is the error
        assume(False)
    actions = data.draw(st.lists(st.floats(0, 1, width=32), min_size=b.steps, max_size=b.steps), label="actions")
    counts = b.policy_counts(np.array(actions, np.float32))
    np.testing.assert_array_equal(counts, numpy_wall(b, np.array(actions, np.float32)))
    macs, _ = net.cost(counts)
    assert macs <= target * net.macs * (1 + 1e-6)
    assert np.all(counts >= b.min_counts) and np.all(counts <= b.sizes)
    steps = np.array([multiple(b, t) for t in range(b.steps)])
    assert np.all((counts % steps == 0) | (counts == b.sizes) | (counts == b.min_counts))


@settings(max_examples=15, deadline=None)
@given(actions=st.lists(st.floats(0, 1, width=32), min_size=30, max_size=30), target=st.floats(0.35, 0.9))
def test_parameter_budget_and_both_budgets(actions, target):
    net = NETS["resnet56"]
    b = budget(net, target_macs=target, target_params=target)
    actions = np.array(actions[:b.steps], np.float32)
    counts = b.policy_counts(actions)
    np.testing.assert_array_equal(counts, numpy_wall(b, actions))
    macs, params = net.cost(counts)
    assert macs <= target * net.macs * (1 + 1e-6) and params <= target * net.params * (1 + 1e-6)


def test_wall_allows_everything_when_budget_is_loose():
    net = NETS["resnet20"]
    b = budget(net, target_macs=0.99)
    counts = b.policy_counts(np.ones(b.steps))
    assert net.cost(counts)[0] <= 0.99 * net.macs
    assert counts.sum() >= 0.95 * b.sizes.sum()


def test_jnp_cost_equals_the_exact_cost():
    net = NETS["mobilenet_v2"]
    b = budget(net)
    counts = np.random.default_rng(0).integers(b.min_counts, b.sizes + 1)
    macs, params = b.cost(jnp.asarray(counts), jnp)
    exact = net.cost(counts)
    assert float(macs) == pytest.approx(exact[0], rel=1e-6) and float(params) == pytest.approx(exact[1], rel=1e-6)


def test_uniform_policy_is_the_largest_single_ratio():
    net = NETS["resnet20"]
    b = budget(net, target_macs=0.5, round_to=1)
    counts = b.uniform_counts()
    assert net.cost(counts)[0] <= 0.5 * net.macs
    assert net.cost(counts)[0] >= 0.4 * net.macs
    assert len(set(np.round(counts / b.sizes, 1))) == 1


def test_default_uniform_policy_rounds_resnet20_to_multiples_of_8():
    """ResNet-20's groups of 16/32/64 channels at 50% of the MACs: the exact uniform policy keeps 11/23/45; by
    default each rounds down to a multiple of 8, at the largest ratio within budget (0.75: 12->8, 24, 48)."""
    net = NETS["resnet20"]
    counts = budget(net, target_macs=0.5).uniform_counts()
    assert counts.tolist() == [8] * 4 + [24] * 4 + [48] * 4
    assert net.cost(counts)[0] <= 0.5 * net.macs < net.cost([16] * 4 + [24] * 4 + [48] * 4)[0]


def test_rounded_counts_are_the_nearest_multiples():
    assert rounded_counts([16, 32, 64], 0.7).tolist() == [8, 24, 48]  # 11.2, 22.4, 44.8
    assert rounded_counts([6, 16, 120, 84], 0.5).tolist() == [3, 8, 64, 40]  # 6 < 16: exact; 60 = 7.5 x 8: to even
    assert rounded_counts([16, 32, 64], 0.7, round_to=1).tolist() == [11, 22, 45]
    assert rounded_counts([16, 32], 0.1).tolist() == [8, 8]  # never below one multiple


def test_min_counts_follow_lbound():
    net = NETS["resnet20"]
    b = budget(net, target_macs=0.5, lbound=0.25, round_to=1)
    assert np.all(b.min_counts == np.ceil(0.25 * b.sizes))
    rounded = budget(net, target_macs=0.5, lbound=0.25)  # ceil(0.25 * size) down to a multiple of 8, at least 8
    assert rounded.min_counts.tolist() == [8] * 8 + [16] * 4


@pytest.mark.parametrize("options, message", [
    ({"target_macs": 1.5}, "(0, 1)"),
    ({"target_macs": 0.0}, "(0, 1)"),
    ({"target_macs": None}, "give a budget"),
    ({"target_macs": 0.01}, "below what lbound"),
    ({"target_macs": 0.5, "reward": "top5"}, "unknown reward"),
    ({"round_to": 0}, "positive integer"),
    ({"round_to": 1000}, "larger than every step"),
])
def test_bad_budgets_are_one_line_errors(options, message):
    with pytest.raises(BudgetError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        budget(NETS["resnet20"], **options)
    assert "\n" not in str(error.value)


def test_amc_state_is_normalised_and_tracks_reduction():
    b = budget(NETS["resnet20"], target_macs=0.5)
    static = amc_features(b.kind)
    assert static.shape == (b.steps, 8)
    assert static.min() >= 0 and static.max() <= 1
    observe = jax.jit(amc_state(b).observe)
    counts = jnp.asarray(b.sizes, jnp.int32)
    actions = jnp.zeros(b.steps).at[2].set(0.2)
    first = observe(0, counts, actions)
    later = observe(3, counts.at[:3].set(jnp.asarray(b.min_counts[:3], jnp.int32)), actions)
    assert first[-3] == 0 and later[-3] > 0  # MACs reduced so far
    assert later[-2] < first[-2]  # MACs still to come
    assert later[-1] == np.float32(0.2) and first[-1] == 1.0  # previous action
