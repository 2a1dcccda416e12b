"""Bit widths as a compression kind: HAQ's action mapping, the exact size budget and its wall on every zoo
network, one compiled evaluation for every bit policy, the rewards, the library API and its export."""
import json
from functools import cache

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agmc_jax.cli import parser
from agmc_jax.compression import CompressConfig
from agmc_jax.embed import amc_state
from agmc_jax.env import REWARDS, Budget, BudgetError, EnvConfig, Environment
from agmc_jax.errors import AgmcError, CheckpointError
from agmc_jax.graph import trace
from agmc_jax.kinds import KINDS, Bits, Channels
from agmc_jax.models import create_model, init_model
from agmc_jax.pipeline import search_config, search_options
from agmc_jax.quant import load_packed
from agmc_jax.quant.size import limbs
from agmc_jax.runs import differences, refuse_foreign
from agmc_jax.search import (RESUME, SearchConfig, _fingerprint, build_config, get_method, saved_fingerprint,
                             search)
from agmc_jax.stages.quantize import quantize_options
from tests.test_env import NETS

MODULE = create_model("lenet5", 10)
VARIABLES = init_model(MODULE, (28, 28, 1))
LENET = trace(MODULE, VARIABLES, (28, 28, 1))
RNG = np.random.default_rng(0)
DATA = (RNG.normal(size=(48, 28, 28, 1)).astype(np.float32), RNG.integers(0, 10, 48).astype(np.int32))


def bit_config(target_size=0.15, **options):
    """A size budget; the bits kind's options (min_bit, max_bit, pinned_bits) go into `kind_options`."""
    bits = {name: options.pop(name) for name in Bits.Options._fields if name in options}
    return EnvConfig(**{"target_macs": None, "target_size": target_size, "eval_batch": 24, **options},
                     kind_options=tuple(sorted(bits.items())))


def bit_budget(net, **options):
    config = bit_config(**options)
    return Budget(Bits(net, config), config)


@cache
def size_terms(net):
    """(kernel elements per layer, bits every policy has) counted from the variables' shapes: one float32 scale
    per output channel of each layer's kernel, every other variable in float32."""
    kernels = {layer.kernel_path for layer in net.layers}
    elements = {path: int(np.prod(shape, dtype=np.int64)) for path, shape in zip(net.paths, net.shapes)}
    fixed = sum(32 * shape[-1] if path in kernels else 32 * elements[path] for path, shape in zip(net.paths, net.shapes))
    return np.array([elements[layer.kernel_path] for layer in net.layers], np.int64), fixed


def reference_size(net, bits_by_layer):
    """Size in bits of a network whose layers' kernels have `bits_by_layer` (exact integers)."""
    elements, fixed = size_terms(net)
    return int(np.dot(elements, np.asarray(bits_by_layer, np.int64))) + fixed


def layer_bits(budget, counts):
    """Bits per layer of a policy: first and last pinned at `pinned_bits`, the others the counts in order."""
    pinned = budget.kind.options.pinned_bits
    return [pinned, *counts, pinned] if pinned is not None else list(counts)


def haq(action, low, high):
    """HAQ's bit width of an action, in float32 as the compiled wall computes it."""
    value = np.float32(high - low + 1) * np.float32(action) + np.float32(low) - np.float32(0.5)
    return int(np.clip(np.round(value), low, high))


def numpy_bit_wall(budget, actions):
    """The wall written plainly: each step's HAQ bit width, capped by the largest width that keeps the budget
    reachable with every later step at min_bit (brute force over widths, sizes from `reference_size`)."""
    low, high = budget.kind.options.min_bit, budget.kind.options.max_bit
    target = budget.config.target_size * 32 * sum(int(np.prod(s)) for s in budget.net.shapes)
    counts = np.full(budget.steps, high)
    for t, action in enumerate(actions):
        fits = [w for w in range(low, high + 1) if reference_size(
            budget.net, layer_bits(budget, [*counts[:t], w, *[low] * (budget.steps - t - 1)])) <= target]
        counts[t] = min(haq(action, low, high), max(fits, default=low))
    return counts


def test_haq_action_mapping_and_its_inverse():
    """An action a is round((max - min + 1) * a + min - 0.5) bits, clipped; count_action(b) asks for b."""
    for low, high in ((2, 8), (1, 4), (4, 16)):
        budget = bit_budget(LENET, target_size=0.9, min_bit=low, max_bit=high, pinned_bits=None)
        actions = np.linspace(0, 1, 1001, dtype=np.float32)
        wanted = jax.vmap(lambda a: budget.space.wanted(0, a, jnp.int32))(actions)
        np.testing.assert_array_equal(wanted, [haq(a, low, high) for a in actions])
        assert set(np.asarray(wanted).tolist()) == set(range(low, high + 1))  # every width is reachable
        bits = jnp.arange(low, high + 1)
        told = jax.vmap(lambda b: budget.count_action(0, b))(bits)
        np.testing.assert_array_equal(jax.vmap(lambda a: budget.space.wanted(0, a, jnp.int32))(told), bits)


BIT_RANGES = ((2, 8, 8), (1, 4, None), (3, 16, 8))  # min_bit, max_bit, pinned_bits
BUDGETS = {}


def zoo_budget(name, bit_range, position):
    """A budget (cached: each compiles its wall) `position` of the way from every searched layer at min_bit to
    every one at max_bit (or float32)."""
    key = (name, bit_range, position)
    if key not in BUDGETS:
        low, high, pinned = bit_range
        net = NETS[name]
        total = 32 * sum(int(np.prod(s)) for s in net.shapes)
        steps = len(net.layers) - (2 if pinned is not None else 0)
        lowest, highest = (reference_size(net, [pinned, *[b] * steps, pinned] if pinned else [b] * steps) / total
                           for b in (low, high))
        target = lowest + position * (min(highest, 1.0) - lowest)
        BUDGETS[key] = bit_budget(net, target_size=target, min_bit=low, max_bit=high, pinned_bits=pinned)
    return BUDGETS[key]


@pytest.mark.parametrize("index, name", list(enumerate(sorted(NETS))))
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_every_finished_bit_policy_meets_the_size_budget_exactly(index, name, data):
    """On every zoo network (sizes past 2^24 bits included; bit ranges and budgets alternate): the compiled wall
    gives the brute-force wall's bits, the policy's size counted from the variables is within budget with no
    slack, and the traced size (int32 limbs) is exactly that count."""
    budget = zoo_budget(name, BIT_RANGES[index % 2], (0.3, 0.7)[index // 2 % 2])
    actions = np.array(data.draw(st.lists(st.floats(0, 1, width=32), min_size=budget.steps,
                                          max_size=budget.steps), label="actions"), np.float32)
    counts = budget.policy_counts(actions)
    np.testing.assert_array_equal(counts, numpy_bit_wall(budget, actions))
    size = reference_size(budget.net, layer_bits(budget, counts))
    assert size <= budget.targets[0] and size == budget.cost(counts)[0]
    high, low = limbs(budget.kind.model, jnp.asarray(counts, jnp.int32))
    assert int(high) * 2 ** 16 + int(low) + budget.kind.model.fixed == size
    assert float(budget.cost(jnp.asarray(counts), jnp)[0]) == pytest.approx(size, rel=1e-6)
    assert bool(budget.feasible(jnp.asarray(counts, jnp.int32), jnp))


def test_sixteen_bits_and_the_uniform_policy():
    """Widths up to 16 bits; the uniform policy is the widest single width within budget."""
    budget = zoo_budget("resnet50", BIT_RANGES[2], 0.5)
    counts = budget.uniform_counts()
    assert len(set(counts.tolist())) == 1 and budget.feasible(counts) and not budget.feasible(counts + 1)
    np.testing.assert_array_equal(budget.policy_counts(np.ones(budget.steps, np.float32))[:1], [16])


def quantized_reference(w, bits):
    """Linear symmetric per-output-channel quantization in NumPy: scale = max|w| / (2^(b-1) - 1)."""
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(w).reshape(-1, w.shape[-1]).max(0) / np.float32(levels)
    return np.clip(np.round(w / scale), -levels, levels) * scale


def quantized_variables(bits_by_layer):
    """LeNet-5's variables with each layer's kernel quantized in NumPy at its bits."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(VARIABLES)]
    for layer, bits in zip(LENET.layers, bits_by_layer):
        leaf = LENET.paths.index(layer.kernel_path)
        leaves[leaf] = quantized_reference(leaves[leaf], bits)
    return jax.tree.unflatten(LENET.treedef, leaves)


def bit_environment(**options):
    config = bit_config(**{"recalibrate_bn": False, **options})
    return Environment(Bits(LENET, config), VARIABLES, DATA[0], DATA[1], config)


def test_one_compilation_scores_every_bit_policy(monkeypatch):
    """Two bit policies are scored by one compiled evaluation, each on kernels on its own bit grid, and its
    accuracy is that of the network with kernels quantized in NumPy."""
    traced = {"n": 0}
    original = Environment.score

    def counted(self, *args):
        traced["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(Environment, "score", counted)
    env = bit_environment()
    mask = jax.jit(env.kind.mask)
    for counts in (np.array([2, 3, 6]), np.array([5, 2, 2])):
        accuracy = env.accuracy(counts[None])[0]
        variables = quantized_variables([8, *counts, 8])
        masked = mask(env.data["kind"], jnp.asarray(counts, jnp.int32))
        for ours, theirs in zip(jax.tree.leaves(masked), jax.tree.leaves(variables)):
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
        expected = np.mean(np.argmax(np.asarray(MODULE.apply(variables, DATA[0])), -1) == DATA[1])
        assert accuracy == pytest.approx(expected, abs=1e-6)
    assert traced["n"] == 1 and env._scores._cache_size() == 1


def test_rewards_normalise_the_size_within_bounds_known_in_advance():
    """acc_norm = (accuracy + saving) / 2, saving = (high - size) / (high - low) between every searched layer at
    min_bit and the budget; acc_flops = -error * log(size); both pure."""
    env = bit_environment(reward="acc_norm")
    low = reference_size(LENET, [8, 2, 2, 2, 8])
    assert env.bounds == (low, pytest.approx(env.targets[0]))
    for counts in (env.min_counts, np.array([4, 3, 2])):
        size = env.cost(counts)[0]
        saving = (env.targets[0] - size) / (env.targets[0] - low)
        reward = jax.jit(env.reward)(jnp.float32(0.5), jnp.asarray(counts))
        assert float(reward) == pytest.approx((0.5 + saving) / 2, rel=1e-5)
        assert float(REWARDS["acc_flops"].score(0.5, size, env.bounds)) == pytest.approx(-0.5 * np.log(size), rel=1e-6)
    assert float(jax.jit(env.reward)(jnp.float32(0.5), jnp.asarray(env.min_counts))) == pytest.approx(0.75)


def test_amc_state_sees_the_size_of_a_bit_policy():
    """AMC's state over bit steps: the reduced fraction is of the float32 size, and grows as bits drop."""
    env = bit_budget(LENET)
    observe = jax.jit(amc_state(env).observe)
    actions = jnp.zeros(env.steps)
    full, lower = (observe(1, jnp.asarray(c, jnp.int32), actions) for c in ([8, 8, 8], [2, 8, 8]))
    assert float(full[-3]) == pytest.approx(1 - env.cost(np.array([8, 8, 8]))[0] / env.totals[0], rel=1e-6)
    assert float(lower[-3]) > float(full[-3])


def test_bits_search_reports_bits_size_and_exports_a_packed_file(tmp_path):
    """`kind="bits"` on another method: the best policy meets the size budget, `bits` names every layer (pinned
    ones at 8), and the packed file holds `size_bits` plus its header and computes the scored network."""
    result = search(MODULE, VARIABLES, DATA, method="random", kind="bits", target_size=0.12, episodes=3,
                    progress=False, out=tmp_path / "s", eval_batch=24)
    assert result.size_bits <= 0.12 * 32 * sum(int(np.prod(s)) for s in LENET.shapes)
    assert list(result.bits) == [l.name for l in LENET.layers] and result.bits["Conv_0"] == result.bits["Dense_2"] == 8
    assert list(result.bits.values())[1:-1] == result.counts.tolist()
    assert result.size_bits == reference_size(LENET, list(result.bits.values()))
    assert result.macs == LENET.macs and result.params == LENET.params
    assert all(h["size_ratio"] <= 0.12 for h in result.history)
    policy = result.policy()
    assert policy["unit"] == "bits" and policy["size_bits"] == result.size_bits and policy["bits"] == result.bits
    written = result.export(tmp_path / "lenet.pak")
    assert written == (tmp_path / "lenet.pak").stat().st_size
    assert 0 <= written * 8 - result.size_bits <= 8 * 2048  # the header
    loaded = load_packed(tmp_path / "lenet.pak", VARIABLES)
    scored = quantized_variables(result.bits.values())  # LeNet-5 has no BatchNorm to re-estimate
    outputs = np.asarray(MODULE.apply(loaded, DATA[0]))
    np.testing.assert_allclose(outputs, MODULE.apply(scored, DATA[0]), atol=1e-5)
    assert result.accuracy == pytest.approx(np.mean(np.argmax(outputs, -1) == DATA[1]), abs=1e-6)
    with pytest.raises(CheckpointError):
        result.export(tmp_path / "lenet.pak")


def test_haq_is_amc_state_ddpg_and_bits_and_channels_do_not_pack():
    method = get_method("haq")
    assert method.kind is KINDS["bits"] and method.agent is not None and method.state.__name__ == "amc_state"
    channels = search(MODULE, VARIABLES, DATA, method="uniform", episodes=1, progress=False, eval_batch=24)
    assert set(channels.bits.values()) == {32}
    assert channels.size_bits == 32 * channels.params < 32 * LENET.params  # LeNet-5 has no BatchNorm statistics
    with pytest.raises(AgmcError, match="slim"):
        channels.export("never-written.pak")


def test_the_size_budget_defaults_to_a_quarter_and_may_come_with_the_environment_options():
    """The CLI can pass every EnvConfig field, target_size included, in one dictionary."""
    method = get_method("haq")
    assert build_config(method, 3, 0, None, None, None, {}).env.target_size == 0.25
    config = build_config(method, 3, 0, None, None, None, {"target_size": 0.2, "max_bit": 6})
    assert (config.env.target_size, config.env.kind_options, config.env.target_macs) == (0.2, (("max_bit", 6),), None)
    config = build_config(get_method("random"), 3, 0, None, None, None, {}, target_size=0.3, kind="bits")
    assert (config.kind, config.env.target_size, config.env.target_macs) == ("bits", 0.3, None)


class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("options, message", [
    ({"min_bit": 6, "max_bit": 4}, "above --max-bit"),
    ({"max_bit": 17}, "1..16"),
    ({"min_bit": 0}, "1..16"),
    ({"pinned_bits": 32}, "1..16"),
    ({"target_size": 1.5}, "(0, 1)"),
    ({"target_size": 0.0}, "(0, 1)"),
    ({"target_size": 0.02}, "below what any network reaches with weights of --min-bit 2"),  # under 2/32: checked first
    ({"target_size": 0.07}, "below what min_bit=2 allows (0.0729 of the float32 size"),  # this network's own floor
    ({"target_size": 0.25, "target_macs": 0.5}, "neither MACs nor parameters"),
    ({"kind": Channels, "target_macs": 0.5, "target_size": 0.25}, "--target-size budgets bit widths"),
])
def test_bad_bit_settings_are_one_line_budget_errors(options, message):
    kind = options.pop("kind", Bits)
    with pytest.raises(BudgetError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        config = bit_config(**options)
        Budget(kind(LENET, config), config)
    assert "\n" not in str(error.value)


def test_bad_kind_budget_and_pinned_network_through_the_library():
    with pytest.raises(BudgetError, match="unknown kind 'int4'; choose one of: ") as error:
        search(MODULE, VARIABLES, DATA, method="random", kind="int4")
    assert all(name in str(error.value) for name in KINDS)
    with pytest.raises(BudgetError, match="--max-bit"):
        search(MODULE, VARIABLES, DATA, method="haq", max_bit=20)
    module = TwoLayers()
    variables = module.init(jax.random.key(0), DATA[0][:1])
    with pytest.raises(BudgetError, match="no layer left to search bits for.*pinned_bits=None"):
        search(module, variables, DATA, method="random", kind="bits", episodes=1, progress=False)


def test_the_environment_config_has_no_bit_fields_the_kind_owns_them():
    """min_bit, max_bit and pinned_bits are the bits kind's `Options` (HAQ's defaults), not EnvConfig fields; the
    config carries the kind's options as sorted pairs and stays hashable."""
    assert not {"min_bit", "max_bit", "pinned_bits"} & set(EnvConfig._fields)
    assert Bits.Options() == (2, 8, 8) and Bits.Options._fields == ("min_bit", "max_bit", "pinned_bits")
    assert not any(hasattr(kind, "Options") for name, kind in KINDS.items() if name != "bits")
    assert hash(bit_config(min_bit=3)) == hash(bit_config(min_bit=3))
    assert Bits(LENET, bit_config()).options == Bits.Options()


@pytest.mark.parametrize("options", [{"kind_options": {"min_bit": 3, "max_bit": 5}}, {"min_bit": 3, "max_bit": 5}])
def test_the_bits_kind_reads_its_options_from_kind_options(options):
    """min_bit=3, max_bit=5 (as kind options, or by name as before they moved): every action maps to 3..5 bits,
    every width is reachable, and the uniform policy is the widest single width in 3..5 within the budget."""
    config = build_config(get_method("haq"), 3, 0, None, None, None, {"target_size": 0.13, **options}).env
    assert config.kind_options == (("max_bit", 5), ("min_bit", 3))
    budget = Budget(Bits(LENET, config), config)
    assert budget.kind.options == Bits.Options(min_bit=3, max_bit=5)
    wanted = jax.vmap(lambda a: budget.space.wanted(0, a, jnp.int32))(np.linspace(0, 1, 101, dtype=np.float32))
    assert set(np.asarray(wanted).tolist()) == {3, 4, 5}
    counts = budget.policy_counts(np.ones(budget.steps, np.float32))
    assert set(counts.tolist()) <= {3, 4, 5}
    target = 0.13 * 32 * sum(int(np.prod(s)) for s in LENET.shapes)
    widest = max(b for b in (3, 4, 5) if reference_size(LENET, [8, b, b, b, 8]) <= target)
    assert widest < 5  # the budget binds
    np.testing.assert_array_equal(budget.uniform_counts(), [widest] * budget.steps)


@pytest.mark.parametrize("method, options, message", [
    ("haq", {"kind_options": {"min_bit": 6, "max_bit": 4}}, "--min-bit 6 is above --max-bit 4; swap them"),
    ("haq", {"kind_options": {"max_bits": 6}},
     "the bits kind has no option max_bits; its options are min_bit, max_bit, pinned_bits"),
    ("amc", {"kind_options": {"min_bit": 3}}, "the channels kind has no option min_bit; it takes none"),
    ("amc", {"min_bit": 3}, "unknown environment option min_bit: neither an EnvConfig field .* nor an option of the "
                            "channels kind .it takes none."),
    ("haq", {"max_bits": 3},
     "unknown environment option max_bits: .* kind .its options are min_bit, max_bit, pinned_bits"),
])
def test_bad_kind_options_are_one_line_errors_before_anything_is_traced(method, options, message):
    with pytest.raises(AgmcError, match=message) as error:
        build_config(get_method(method), 3, 0, None, None, None, options)
    assert "\n" not in str(error.value)


def test_a_kind_without_options_refuses_them_in_its_budget():
    config = EnvConfig(kind_options=(("pinned_bits", None),))
    with pytest.raises(BudgetError, match="the channels kind has no option pinned_bits; it takes none"):
        Budget(Channels(LENET, config), config)
    with pytest.raises(BudgetError, match="kind_options must be a tuple of .name, value. pairs"):
        Budget(Channels(LENET, EnvConfig()), EnvConfig(kind_options={"min_bit": 3}))


def _before_kind_options(fingerprint, **moved):
    """A fingerprint as a search saved before the bits kind owned its options: every EnvConfig then had min_bit,
    max_bit and pinned_bits (HAQ's defaults unless given), and no kind_options."""
    saved = json.loads(json.dumps(fingerprint))
    del saved["env"]["kind_options"]
    saved["env"].update({"min_bit": 2, "max_bit": 8, "pinned_bits": 8, **moved})
    return saved


def test_a_search_saved_before_the_kind_owned_its_options_resumes():
    """An old fingerprint's min_bit/max_bit/pinned_bits compare as the kind options they now are (bits), or not at all
    (a kind without options); a different saved value is still a change."""
    env = bit_environment(max_bit=6)
    config = SearchConfig(method="haq", env=env.config)
    fingerprint = _fingerprint(env, config, VARIABLES, DATA)
    assert fingerprint["env"]["kind_options"] == [("max_bit", 6), ("min_bit", 2), ("pinned_bits", 8)]
    assert differences(saved_fingerprint(_before_kind_options(fingerprint, max_bit=6), fingerprint), fingerprint,
                       **RESUME) == []
    with pytest.raises(CheckpointError, match="env.kind_options .*'max_bit', 7.* -> .*'max_bit', 6"):
        refuse_foreign(saved_fingerprint(_before_kind_options(fingerprint, max_bit=7), fingerprint), fingerprint,
                       "old", "resume with the saved settings", **RESUME)
    channels = EnvConfig(eval_batch=24, recalibrate_bn=False)
    env = Environment(Channels(LENET, channels), VARIABLES, DATA[0], DATA[1], channels)
    fingerprint = _fingerprint(env, SearchConfig(method="amc", env=channels), VARIABLES, DATA)
    assert fingerprint["env"]["kind_options"] == []
    assert differences(saved_fingerprint(_before_kind_options(fingerprint), fingerprint), fingerprint, **RESUME) == []


def test_an_old_bits_search_on_disk_resumes(tmp_path, monkeypatch):
    """A bits search whose checkpoint metadata has the old env fields resumes (its episodes are not played again)."""
    options = dict(method="random", kind="bits", target_size=0.12, episodes=2, progress=False, out=tmp_path / "s",
                   eval_batch=24, max_bit=6)
    first = search(MODULE, VARIABLES, DATA, **options)
    read = search.__globals__["checkpoint"].metadata

    def old_metadata(directory, step=None):
        saved = read(directory, step)
        return {**saved, "env": _before_kind_options(saved, max_bit=6)["env"]}

    monkeypatch.setattr(search.__globals__["checkpoint"], "metadata", old_metadata)
    resumed = search(MODULE, VARIABLES, DATA, resume=True, **options)
    assert resumed.history == first.history


def test_the_bit_flags_of_search_and_compress_become_the_kinds_options():
    """`agmc search --min-bit/--max-bit` and `agmc compress`'s (its quantize stage's) reach the bits kind as
    kind_options; without them the kind's defaults hold and the search's config gives none."""
    args = parser().parse_args(["search", "--workdir", "w", "--out", "o", "--method", "haq", "--min-bit", "3",
                                "--max-bit", "5"])
    assert search_config(**search_options(args)).env.kind_options == (("max_bit", 5), ("min_bit", 3))
    args = parser().parse_args(["search", "--workdir", "w", "--out", "o", "--method", "haq"])
    assert search_config(**search_options(args)).env.kind_options == ()
    config = CompressConfig(stages=("prune", "quantize"), target_macs=0.5, quant_max_bit=6)
    assert search_config(**quantize_options(config)).env.kind_options == (("max_bit", 6),)
    assert search_config(**search_options(config)).env.kind_options == ()  # the prune stage's channels take none


def test_any_kind_option_comes_from_the_command_line_read_as_the_kind_declares_it(capsys):
    """`--kind-option KEY=VALUE` reaches the kind's `Options` as their types (an int; 'none' for an optional one);
    a value of another type, a name the kind lacks, or an option for channels is one line at the config, before
    anything runs; the help lists the kinds' options."""
    args = parser().parse_args(["search", "--workdir", "w", "--out", "o", "--method", "haq", "--kind-option",
                                "min_bit=3", "--kind-option", "pinned_bits=none"])
    assert search_config(**search_options(args)).env.kind_options == (("min_bit", 3), ("pinned_bits", None))
    args = parser().parse_args(["search", "--workdir", "w", "--out", "o", "--method", "haq", "--kind-option",
                                "min_bit=three"])
    with pytest.raises(BudgetError, match="the bits kind's option min_bit takes an int, got 'three'"):
        search_config(**search_options(args))
    with pytest.raises(BudgetError, match="the channels kind has no option min_bit; it takes none"):
        CompressConfig(target_macs=0.5, kind_option={"min_bit": "3"})
    with pytest.raises(SystemExit):
        parser().parse_args(["search", "--help"])
    assert "bits: min_bit, max_bit, pinned_bits" in " ".join(capsys.readouterr().out.split())


def test_kind_options_that_would_be_dropped_or_contradicted_are_refused():
    """The quantize stage alone does not read --kind-option (it takes --min-bit/--max-bit): refused, not dropped; a
    --min-bit that contradicts --kind-option min_bit is one line; a non-mapping is a typed error in the library."""
    with pytest.raises(AgmcError, match="--kind-option sets the prune stage's kind"):
        CompressConfig(stages=("quantize",), kind_option=("min_bit=3",))
    args = parser().parse_args(["search", "--workdir", "w", "--out", "o", "--method", "haq", "--kind-option",
                                "min_bit=3", "--min-bit", "4"])
    with pytest.raises(AgmcError, match="--min-bit 4 and --kind-option min_bit=3 disagree"):
        search_options(args)
    with pytest.raises(AgmcError, match="kind_option must be a dict or KEY=VALUE strings, got 5"):
        CompressConfig(target_macs=0.5, kind_option=5)
    for name, value in (("kind_options", "min_bit=3"), ("agent_options", 5)):
        with pytest.raises(AgmcError, match=f"{name} must be a dict"):
            search(MODULE, VARIABLES, DATA, method="haq", episodes=1, progress=False, **{name: value})
