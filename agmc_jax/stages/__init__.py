"""The stages of `agmc_jax.compress`: prune (search, slim, fine-tune), autocompress (AutoCompress's rounds) and
quantize (bit widths, QAT, packed export), each one module registered by name."""
from agmc_jax.stages import autocompress, prune, quantize  # noqa: F401  (each registers its stage)
from agmc_jax.stages.registry import STAGES, Stage, StageRun, describe_stages, ordered_stages, register_stage

__all__ = ["STAGES", "Stage", "StageRun", "describe_stages", "ordered_stages", "register_stage"]
