"""A compress stage added from outside agmc_jax: after pruning, write the network as a jax.export artifact.

A stage is five things (`agmc_jax.Stage`): `check(config)` and `check_network(config, network, first)` refuse
what it cannot run before anything expensive starts; `run(run, source, report)` takes the directory of the
network the previous stage left and returns (the report with its section, the directory of the network it leaves);
`markdown(report)` is its section of `report.md`; a description for `--help`. Stages run in the order they were
registered, so this one runs after `prune`.

    agmc --plugin examples.portable_stage compress --workdir agmc_jax/baselines/lenet5_fashion_mnist \
        --out runs/portable --stages prune,portable --method agmc --target-macs 0.5
"""
import agmc_jax
from agmc_jax.networks import load_network


def check(config):
    """Nothing in the config to refuse."""


def check_network(config, network, first):
    """Nothing in the input network to refuse."""


def run(run, source, report):
    """Export the network in `source` to OUT/portable (skipped when a resumed run already did)."""
    module, variables, train_config = load_network(source)
    out = run.out / "portable"
    if not (out / "export.json").exists():
        agmc_jax.export_network(module, variables, tuple(train_config["input_shape"]), out)
    size = sum(f.stat().st_size for f in out.iterdir())
    return {**report, "portable": {"dir": str(out), "bytes": size}}, source


def markdown(report):
    return f"\n## Portable export\n\n{report['portable']['bytes']:,} bytes in {report['portable']['dir']}\n"


agmc_jax.register_stage("portable", agmc_jax.Stage(check, check_network, run, markdown,
                                                   "write the network as a jax.export artifact (example)"))
