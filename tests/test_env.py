"""The budget and its action wall: every finished policy meets the budget, on every zoo network."""
import jax
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from agmc_jax.env import Budget, BudgetError, EnvConfig
from agmc_jax.graph import trace
from agmc_jax.models import MODELS, create_model

SMALL_INPUTS = {"lenet5": (28, 28, 1), "vgg16": (32, 32, 3), "mobilenet_v1": (32, 32, 3),
                "mobilenet_v2": (32, 32, 3), "resnet18": (32, 32, 3), "resnet50": (32, 32, 3)}


def traced(name):
    module = create_model(name, 10)
    shape = SMALL_INPUTS.get(name, (16, 16, 3))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, *shape), np.float32)))
    return trace(module, variables, shape)


NETS = {name: traced(name) for name in MODELS}


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_finished_policy_meets_macs_budget(name, data):
    net = NETS[name]
    target = data.draw(st.floats(0.3, 0.9), label="target")
    round_to = data.draw(st.sampled_from([1, 8]), label="round_to")
    try:
        budget = Budget(net, EnvConfig(target_macs=target, round_to=round_to))
    except BudgetError:  # rounding to 8 can make lbound's policy too big: then that is the error
        assume(False)
    actions = data.draw(st.lists(st.floats(0, 1), min_size=budget.steps, max_size=budget.steps), label="actions")
    counts = budget.policy_counts(budget.action_to_ratio(np.array(actions)))
    macs, _ = net.cost(counts)
    assert macs <= target * net.macs * (1 + 1e-9)
    assert np.all(counts >= budget.min_counts) and np.all(counts <= budget.sizes)
    if round_to > 1:
        assert np.all((counts % round_to == 0) | (counts == budget.sizes) | (counts == budget.min_counts))


@settings(max_examples=25, deadline=None)
@given(actions=st.lists(st.floats(0, 1), min_size=30, max_size=30), target=st.floats(0.35, 0.9))
def test_parameter_budget_and_both_budgets(actions, target):
    net = NETS["resnet56"]
    budget = Budget(net, EnvConfig(target_macs=target, target_params=target))
    counts = budget.policy_counts(budget.action_to_ratio(np.array(actions[:budget.steps])))
    macs, params = net.cost(counts)
    assert macs <= target * net.macs * (1 + 1e-9) and params <= target * net.params * (1 + 1e-9)


def test_wall_allows_everything_when_budget_is_loose():
    net = NETS["resnet20"]
    budget = Budget(net, EnvConfig(target_macs=0.99))
    counts = budget.policy_counts(np.ones(budget.steps))
    assert net.cost(counts)[0] <= 0.99 * net.macs
    assert counts.sum() >= 0.95 * budget.sizes.sum()


def test_uniform_policy_is_the_largest_single_ratio():
    net = NETS["resnet20"]
    budget = Budget(net, EnvConfig(target_macs=0.5))
    counts = budget.uniform_counts()
    assert net.cost(counts)[0] <= 0.5 * net.macs
    assert net.cost(counts)[0] >= 0.4 * net.macs
    assert len(set(np.round(counts / budget.sizes, 1))) == 1


def test_min_counts_follow_lbound():
    net = NETS["resnet20"]
    budget = Budget(net, EnvConfig(target_macs=0.5, lbound=0.25))
    assert np.all(budget.min_counts == np.ceil(0.25 * budget.sizes))


@pytest.mark.parametrize("config, message", [
    (EnvConfig(target_macs=1.5), "(0, 1)"),
    (EnvConfig(target_macs=0.0), "(0, 1)"),
    (EnvConfig(target_macs=None), "give a budget"),
    (EnvConfig(target_macs=0.01), "below what lbound"),
    (EnvConfig(target_macs=0.5, reward="top5"), "unknown reward"),
])
def test_bad_budgets_are_one_line_errors(config, message):
    with pytest.raises(BudgetError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        Budget(NETS["resnet20"], config)
    assert "\n" not in str(error.value)


def test_amc_state_is_normalised_and_tracks_reduction():
    net = NETS["resnet20"]
    budget = Budget(net, EnvConfig(target_macs=0.5))
    static = budget.amc_features()
    assert static.shape == (budget.steps, 8)
    assert static.min() >= 0 and static.max() <= 1
    counts = np.array(budget.sizes)
    first = budget.amc_state(static, 0, counts, 1.0)
    counts[:3] = budget.min_counts[:3]
    later = budget.amc_state(static, 3, counts, 0.2)
    assert first[-3] == 0 and later[-3] > 0  # MACs reduced so far
    assert later[-2] < first[-2]  # MACs still to come
    assert later[-1] == np.float32(0.2)
