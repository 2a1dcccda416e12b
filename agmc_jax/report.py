"""Human-readable output: per-layer tables and PNG plots of a search (written atomically: a rerun replaces them)."""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from agmc_jax import checkpoint  # noqa: E402


def layer_table(net) -> str:
    """A fixed-width table of every layer with its channels, MACs and parameters, and the totals."""
    rows = [f"{'layer':<44} {'kind':<10} {'in':>6} {'out':>6} {'kernel':>7} {'stride':>6} {'MACs':>14} "
            f"{'params':>11} {'group':>5}"]
    for l in net.layers:
        kernel = "x".join(map(str, l.kernel_size)) or "-"
        stride = "x".join(map(str, l.stride)) or "-"
        rows.append(f"{l.name[-44:]:<44} {l.kind:<10} {l.in_channels:>6} {l.out_channels:>6} {kernel:>7} "
                    f"{stride:>6} {l.macs:>14,} {l.params:>11,} {l.out_group:>5}")
    rows.append(f"total: {net.params:,} parameters, {net.macs:,} MACs per example "
                f"({net.macs / 1e6:.2f}M; MACs = multiply-accumulates of conv and dense layers), "
                f"{len(net.group_sizes)} prunable channel groups")
    rows.extend(f"warning: {w}" for w in net.warnings)
    return "\n".join(rows)


def title_markdown(report) -> str:
    """The report's title, and the dense accuracy alone when no stage left a pruned network's summary."""
    title = f"# {report['model']} on {report['dataset']}: {report['method']}\n"
    if "macs" in report:
        return title
    return title + "\n| accuracy | dense |\n|---|---|\n" + "".join(
        f"| {split} | {report['accuracy']['dense'][split]:.4f} |\n" for split in ("validation", "test"))


def pruned_markdown(report) -> str:
    """A pruned network's summary (MACs, parameters, latency, accuracy before and after) and its layers."""
    acc, latency = report["accuracy"], report["latency_ms_batch128"]
    lines = ["", "| | dense | compressed | ratio |", "|---|---|---|---|",
             f"| MACs | {report['macs']['dense']:,} | {report['macs']['slim']:,} | {report['macs']['ratio']:.3f} |",
             f"| parameters | {report['params']['dense']:,} | {report['params']['slim']:,} | "
             f"{report['params']['ratio']:.3f} |",
             f"| latency, batch 128 (ms) | {latency['dense']:.1f} | {latency['slim']:.1f} | "
             f"{latency['slim'] / latency['dense']:.3f} |", "",
             "| accuracy | dense | pruned | fine-tuned |", "|---|---|---|---|"]
    for split in ("validation", "test"):
        lines.append(f"| {split} | {acc['dense'][split]:.4f} | {acc['pruned'][split]:.4f} | "
                     f"{acc['finetuned'][split]:.4f} |")
    lines += ["", "| layer | channels before | after |", "|---|---|---|"]
    lines += [f"| {l['name']} | {l['out']} | {l['kept']} |" for l in report["layers"]]
    return "\n".join(lines) + "\n"


def plot_rewards(history, path):
    """Reward per episode and the best so far."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    episodes = [h["episode"] for h in history]
    axis.plot(episodes, [h["reward"] for h in history], ".", alpha=0.5, label="episode")
    axis.plot(episodes, [h["best_reward"] for h in history], "-", label="best so far")
    axis.set_xlabel("episode")
    axis.set_ylabel("reward")
    axis.legend()
    _save(figure, path)


def plot_keep(policy, path):
    """Kept channels (or weights) per layer against the original ones."""
    layers = policy["layers"]
    figure, axis = plt.subplots(figsize=(max(6, len(layers) * 0.25), 3.5))
    positions = range(len(layers))
    axis.bar(positions, [l["out"] for l in layers], color="lightgray", label="original")
    axis.bar(positions, [l["kept"] for l in layers], color="tab:blue", label="kept")
    axis.set_xlabel("layer")
    axis.set_ylabel("output channels" if policy["unit"] == "channels" else "weights")
    axis.set_title(f"MACs {policy['macs_ratio']:.1%} of the original, parameters {policy['params_ratio']:.1%}")
    axis.legend()
    _save(figure, path)


def _save(figure, path):
    """Write `figure` as a PNG to `path` in one rename, and close it."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    checkpoint.write_bytes(path, buffer.getvalue())
