"""Network directories: a trained workdir, or a pruned network saved with its zoo configuration.

A pruned directory holds `network.json` (the training config it came from, whether it is `slim`
or `masked`, its counts) and `variables/` (an orbax checkpoint). A slim network reloads as
`Slimmed(zoo module)` with the smaller arrays, with no masks and no reference to the original.
A quantized directory adds the bit widths, whether its base is slim, and `model.packed` (the packed
export, whose size is the network's); its `variables/` are the latent float weights, and it reloads as
`Quantized(zoo module or Slimmed(zoo module), bits)`, so it can be evaluated and fine-tuned further.
"""
import json
import os
from pathlib import Path

import jax
import numpy as np

from agmc_jax import checkpoint, data
from agmc_jax.env import rounded_counts
from agmc_jax.errors import CheckpointError
from agmc_jax.graph import trace
from agmc_jax.hosts import place
from agmc_jax.prune import (Slimmed, apply_masks, masks_from_vectors, recalibrate, reconstruct, slim,
                            top_channels)
from agmc_jax.prune.lstsq import REFIT_IMAGES
from agmc_jax.quant import Quantized, freeze_bits, save_packed
from agmc_jax.train import (build_module, config_from_dict, data_mesh, evaluate_source, load_trained,
                            make_eval_step)


def save_network(out, kind, config_dict, variables, info):
    """Write a pruned network to the new directory `out` (never over an existing one)."""
    out = Path(out)
    if (out / "network.json").exists():
        raise CheckpointError(f"{out} already holds a network; choose a new --out")
    checkpoint.save(out / "variables", 0, variables)
    description = json.dumps({"kind": kind, "config": config_dict, **info}, indent=1) + "\n"
    checkpoint.write_text(out / "network.json", description)


def mark_trained_slim(workdir, config_dict):
    """Mark a training workdir as holding a slimmed network (its shapes come from the checkpoint)."""
    checkpoint.write_text(Path(workdir) / "network.json",
                          json.dumps({"kind": "slim", "trained": True, "config": config_dict}, indent=1) + "\n")


PACKED = "model.packed"


def _bits_json(bits):
    """Bit widths as JSON: [[kernel path, bits], ...]."""
    return [[list(path), width] for path, width in freeze_bits(bits)]


def save_quantized(out, config_dict, variables, bits, slim_base, info):
    """Write a quantized network (latent float `variables`, `bits`: kernel path -> width, `slim_base`: whether it
    runs on `Slimmed`) and its packed export to the new directory `out`; returns the packed file's bytes."""
    out = Path(out)
    if (out / "network.json").exists():
        raise CheckpointError(f"{out} already holds a network; choose a new --out")
    size = save_packed(out / PACKED, variables, bits)
    save_network(out, "quantized", config_dict, variables,
                 {**info, "slim": slim_base, "bits": _bits_json(bits), "packed": PACKED, "packed_bytes": size})
    return size


def mark_trained_quantized(workdir, config_dict, bits, slim_base):
    """Mark a training workdir as holding a quantization-aware fine-tuned network (its checkpoints: latent weights)."""
    (Path(workdir) / "network.json").write_text(json.dumps(
        {"kind": "quantized", "trained": True, "slim": slim_base, "bits": _bits_json(bits), "config": config_dict},
        indent=1) + "\n")


def _wrapped(module, values):
    """The zoo module as a directory's kind runs it: slimmed, quantized (on a slim or full base), or as is."""
    if values["kind"] == "quantized":
        return Quantized(Slimmed(module) if values.get("slim") else module, values.get("bits"))
    return Slimmed(module) if values["kind"] == "slim" else module


def load_network(path):
    """(module, variables, config dict) of a trained workdir or a pruned network directory."""
    path = Path(path)
    description = path / "network.json"
    if not description.exists():
        _check_not_an_output(path)
        return load_trained(path)
    try:
        values = json.loads(description.read_text())
        config = config_from_dict(values["config"], str(description))
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{description} is corrupt ({error}); prune or search again") from error
    module = build_module(config)
    if values.get("trained"):
        state = checkpoint.restore(path / "checkpoints")
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    else:
        variables = checkpoint.restore(path / "variables")
    return _wrapped(module, values), variables, values["config"]


STAGE_OUTPUTS = ("quantize/qat", "search/finetune", "finetune", "search/slim", "slim", "quantized")  # last first


def _holds_network(path) -> bool:
    return (path / "network.json").exists() or (path / "config.json").exists()


def final_network(path):
    """The network directory `path` stands for: itself if it holds one, else the last stage of the `agmc compress`
    or `agmc search` output in it; a stage that started and did not finish (no network.json yet) is refused
    rather than passed over for an earlier stage's network."""
    path = Path(path)
    if _holds_network(path):
        return path
    for stage in STAGE_OUTPUTS:
        if (path / stage / "network.json").exists():
            return path / stage
        if (path / stage).exists() and any((path / stage).iterdir()):
            raise CheckpointError(f"{path / stage} has not finished (no network.json): finish the run with --resume "
                                  "before exporting it")
    raise CheckpointError(f"{path} holds no network (nor a compress or search output with one); give a trained, "
                          "pruned, fine-tuned or quantized network directory")


def evaluate_variables(module, variables, config_dict, split="test", data_dir=None, source=None, batch_size=256):
    """Loss and accuracy of (module, variables) on a split of the network's dataset."""
    config = config_from_dict(config_dict)
    source = source if source is not None else data.load(config.dataset, split, data_dir or config.data_dir)
    mesh = data_mesh()
    variables = place(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return evaluate_source(variables, make_eval_step(mesh, module, config.dtype), source, config, mesh, batch_size)


def accuracies(module, variables, config_dict, data_dir=None) -> dict:
    """Top-1 of (module, variables) on the validation and test splits of the network's dataset."""
    return {split: evaluate_variables(module, variables, config_dict, split, data_dir)["accuracy"]
            for split in ("validation", "test")}


def float_bytes(variables) -> int:
    """The size of `variables` stored as float32."""
    return 4 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables))


def evaluate_network(path, split="test", data_dir=None):
    """Loss, accuracy and count of the network stored at `path`."""
    module, variables, config = load_network(path)
    return evaluate_variables(module, variables, config, split, data_dir)


def calibration_images(config_dict, count=256, data_dir=None):
    """Validation images for least-squares reconstruction and BatchNorm re-estimation (never the test split)."""
    config = config_from_dict(config_dict)
    return data.load_arrays(config.dataset, "validation", data_dir or config.data_dir, limit=count)[0]


def _check_not_an_output(path: Path) -> None:
    """Raise a `CheckpointError` that says what `path` is and which directory in it to give, when it is the --out of
    `agmc search` or `agmc compress` rather than a network directory."""
    what = _what_it_holds(path) if path.is_dir() and not (path / "config.json").exists() else ""
    if not what:
        return
    try:
        hint = f"give its network directory instead, e.g. {final_network(path)}"
    except CheckpointError:
        hint = "finish it with --resume, then give its network directory (e.g. OUT/slim)"
    raise CheckpointError(f"{path} is not a network directory ({what}); {hint}")


def _what_it_holds(out: Path) -> str:
    """What another command left in `out`, for the messages that refuse it as a run to resume or as a network ('' when
    unknown)."""
    if (out / "report.json").exists() or (out / "search").is_dir():
        return "it is the --out of `agmc compress`"
    if (out / "search_state").is_dir() or (out / "policy.json").exists():
        return "it is the --out of `agmc search`"
    if (out / "config.json").exists() or (out / "checkpoints").is_dir():
        return "it is a training workdir"
    return ""


def check_resumable(out, command: str, writes) -> None:
    """Refuse to resume an `out` that holds a name `agmc command` never writes there (another command's output or
    unrelated files): resuming would start a new run among them. Hidden names (the lock, partial writes) pass."""
    out = Path(out)
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in writes) \
        if out.is_dir() else []
    if foreign:
        what = _what_it_holds(out) or f"{foreign[0]} is not one of its files"
        raise CheckpointError(f"--resume: {out} does not hold an `agmc {command}` run ({what}); give the --out of an "
                              f"earlier `agmc {command}`, or a new --out without --resume")


def check_new_output(workdir, out, resume=None, command=None, writes=()):
    """Refuse an `out` that is the input `workdir`, a file, or (unless `resume`) a directory holding files;
    `resume` is None for commands that cannot resume. With `command`, a resumed `out` may hold only the names in
    `writes` (`check_resumable`)."""
    out = Path(out)
    if out.exists() and Path(workdir).exists() and out.resolve() == Path(workdir).resolve():
        raise CheckpointError(f"--out {out} is the --workdir it reads; choose a new --out")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; choose a directory for --out")
    parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {out} cannot be written: {parent} is "
                              f"{'a file' if not parent.is_dir() else 'not writable'}; choose another --out")
    checkpoint.check_free(out)
    if resume and command:
        check_resumable(out, command, writes)
    if out.is_dir() and not resume and any(p.name != checkpoint.LOCK for p in out.iterdir()):
        raise CheckpointError(f"{out} already holds files; choose a new --out"
                              + (" or pass --resume to continue what is there" if resume is not None else ""))


def prune_uniform(workdir, keep, criterion, out, data_dir=None, recalibrate_bn=True, round_to=None):
    """Apply one keep ratio to every channel group, each count rounded to the nearest multiple of `round_to`
    (None: `channel_multiples`), refit for lstsq on `REFIT_IMAGES` validation images, BatchNorm statistics
    re-estimated on 256 of them unless `recalibrate_bn` is False; slim, save to `out`; returns the counts and
    accuracy."""
    check_new_output(workdir, out)
    module, variables, config = load_network(workdir)
    net = trace(module, variables, tuple(config["input_shape"]))
    counts = rounded_counts(net.group_sizes, keep, round_to)
    masks = masks_from_vectors(net, top_channels(net, variables, counts, criterion))
    images = calibration_images(config, REFIT_IMAGES if criterion == "lstsq" else 256, data_dir) \
        if criterion == "lstsq" or recalibrate_bn else None
    if criterion == "lstsq":
        variables = reconstruct(net, variables, masks, images)
    if recalibrate_bn:
        variables = recalibrate(module, apply_masks(net, variables, masks), images[:256], **net.call_kwargs)
    slim_module, slim_variables = slim(net, variables, masks)
    macs, params = net.cost(counts)
    info = {"source": str(workdir), "keep": keep, "round_to": round_to, "counts": counts.tolist(),
            "criterion": criterion, "recalibrate_bn": recalibrate_bn, "macs": int(macs), "params": int(params),
            "macs_ratio": macs / net.macs, "params_ratio": params / net.params}
    with checkpoint.new_directory(out) as partial:
        save_network(partial, "slim", config, slim_variables, info)
    validation = evaluate_variables(slim_module, slim_variables, config, "validation", data_dir)
    return {**info, "validation_accuracy": validation["accuracy"]}

