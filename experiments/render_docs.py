"""Render the generated pages of the documentation from what the code and the experiments hold.

- `docs/cli.md`, the command-line reference, from `agmc_jax.cli.parser()`: every command, option, default and help;
- `docs/results/*.md` and the headline table of `README.md` (between its `results:begin` and `results:end`
  comments) from the JSON files under `experiments/results/` alone: the command, date and machine of each run,
  mean ± standard deviation over seeds. No figure is typed by hand.

    python experiments/render_docs.py                 # rewrite them
    python experiments/render_docs.py --check         # exit 1 naming every stale file (tests/test_docs.py runs it)
    python experiments/render_docs.py --proxy-study   # also docs/proxy_study.md (its own --report, about a minute)

`docs/proxy_study.md` is written by `experiments/proxy_study.py --report`; `--check` only compares its policy counts
with the JSON records, because its bootstrap takes a minute.
"""
import argparse
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from agmc_jax.search import default_criterion

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin (experiments/render_docs.py writes this table) -->", "<!-- results:end -->"
REFRESH = "python experiments/render_docs.py"
PROXY_REPORT = ("python experiments/proxy_study.py --out experiments/results/proxy_study --report "
                "docs/proxy_study.md")
SEARCH_METHODS = ("default", "uniform", "uniform_lstsq", "amc", "random", "annealing")
ROW_NOTES = {  # rows that are not a method of `agmc compress --method`
    "uniform_lstsq": "the uniform rule with the default's least-squares refit",
    "uniform_round1": "the uniform rule with channel counts rounded to 1 (`round_to=1`)",
    "default_l2": "the default with channels chosen by L2 norm and no least-squares refit (`criterion=l2`)",
    "default_rerun": "the default run again on a second machine of the same kind: the same best policy of the "
                     "search, other 128-step re-rank scores (see its records' `rerank`)"}


# ---------------------------------------------------------------------------------------------------- the CLI

def _cell(text) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _option(action) -> str:
    if not action.option_strings:
        return f"`{action.dest}`"
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} `{action.metavar or action.dest.upper()}`"


def _default(action) -> str:
    if action.required or not action.option_strings:
        return "required"
    default = action.default
    if isinstance(action, argparse.BooleanOptionalAction):
        return "" if default is None else "on" if default else "off"
    if default is None or default is argparse.SUPPRESS or default is False or default == []:
        return ""
    if isinstance(default, (tuple, list)):
        return f"`{','.join(map(str, default))}`"
    return f"`{default}`"


def _options_table(parser) -> list:
    rows = ["| option | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if action.dest in ("help", "command") or action.help == argparse.SUPPRESS:
            continue
        rows.append(f"| {_option(action)} | {_default(action)} | {_cell(action.help or '')} |")
    return rows


def cli_markdown() -> str:
    """docs/cli.md: the reference of every `agmc` command, from the parser the command line runs."""
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal; fixed here so the page is stable
    from agmc_jax.cli import parser as build_parser

    top = build_parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = ["# Command-line reference", "",
             f"Generated from `agmc_jax.cli.parser()` by `{REFRESH}`; `tests/test_docs.py` fails when this page "
             "and the parser differ. `agmc COMMAND --help` prints the same. The methods, kinds, rewards and stages "
             "named in the help are the registered ones: a `--plugin` module adds its own.", "",
             "Every user mistake is one line on stderr and exit status 2; Ctrl-C and SIGTERM stop in one line "
             "(status 130 and 143).", "",
             "## agmc", "", _cell(top.description), "", "```text", top.format_usage().strip(), "```", "",
             "Options before the command:", "", *_options_table(top), "",
             "| command | what it does |", "|---|---|",
             *[f"| [`agmc {name}`](#agmc-{name}) | {_cell(helps.get(name, ''))} |" for name in commands.choices], ""]
    for name, sub in commands.choices.items():
        lines += [f"## agmc {name}", "", _cell(helps.get(name, "")), "", "```text", sub.format_usage().strip(), "```",
                  "", *_options_table(sub), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ results I/O

def _load(path: Path) -> dict:
    record = json.loads(path.read_text())
    record["_file"] = path.relative_to(RESULTS).as_posix()
    return record


def records(experiment: str, pattern: str = "**/*.json") -> list:
    """Every JSON record of `experiment`, in path order."""
    folder = RESULTS / experiment
    return [_load(p) for p in sorted(folder.glob(pattern)) if p.is_file()] if folder.is_dir() else []


def spread(values, scale=1.0, digits=2) -> str:
    """'mean ± std' (population) of the finite values times `scale`; one value alone; '—' for none."""
    values = np.array([v for v in values if v is not None], np.float64) * scale
    values = values[np.isfinite(values)]
    if not len(values):
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def provenance(rows, fallback_command: str) -> list:
    """Lines saying which commands, dates and machines the rows come from."""
    commands = sorted({r.get("command") for r in rows if r.get("command")})
    dates = sorted({r.get("date") for r in rows if r.get("date")})
    machines = sorted({r.get("machine") for r in rows if r.get("machine")})
    missing = sum(1 for r in rows if not r.get("command"))
    lines = []
    if missing:
        lines += [f"Command ({missing} of {len(rows)} records do not name theirs; the script documents it as):", "",
                  "```bash", fallback_command, "```", ""]
    if commands:
        lines += ["Command" + ("s" if len(commands) > 1 else "") + " (as recorded):", "", "```bash", *commands, "```",
                  ""]
    lines.append(f"Dates: {dates[0]} to {dates[-1]}." if len(dates) > 1 else
                 f"Date: {dates[0]}." if dates else "Date: not recorded.")
    lines.append(f"Machine: {'; '.join(machines)}." if machines else "Machine: not recorded.")
    return lines + [""]


def documented_command(script: str) -> str:
    """The first `python experiments/...` command in a script's docstring (with its continuation lines)."""
    text = ast.get_docstring(ast.parse((ROOT / "experiments" / script).read_text())) or ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"python experiments/{script}"):
            command = [line.strip()]
            while command[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                command.append("    " + lines[i].strip())
            return "\n".join(command)
    return f"python experiments/{script}"


def _header(title: str, script: str, intro: str, rows=None) -> list:
    """A results page's title and introduction; given `rows`, then their provenance, or that none has finished."""
    lines = [f"# {title}", "",
             f"Rendered by `{REFRESH}` from `experiments/results/{Path(script).stem}/` (written by "
             f"`experiments/{script}`); do not edit by hand. {intro}", ""]
    if rows is None:
        return lines
    return lines + (provenance(rows, documented_command(script)) if rows else ["No run has finished yet.", ""])


# ------------------------------------------------------------------------------------------- the experiments

def search_experiment_page(rows) -> str:
    lines = _header("Does the search earn its keep? (issue #22)", "search_experiment.py",
                    "Each method's network after the same standard fine-tune of `agmc compress`, test top-1 on the "
                    "10,000 test images; `default` is `agmc compress` with the settings named below. Mean ± "
                    "standard deviation over seeds (population), n seeds per row.", rows)
    if not rows:
        return "\n".join(lines)
    default = [r for r in rows if r["method"] == "default"]
    if default:
        changed = sorted({f"{k}={v}" for r in default for k, v in _changed(r, rows)})
        lines += ["`default` row's settings beyond the other rows': " + (", ".join(f"`{c}`" for c in changed)
                  or "none") + ".", ""]
    for net in sorted({_network(r) for r in rows}):
        lines += [f"## {_network_title(net, rows)}", ""]
        for budget in sorted({r["budget"] for r in rows if _network(r) == net}):
            lines += _budget_table([r for r in rows if _network(r) == net and r["budget"] == budget], budget)
    return "\n".join(lines)


def _budget_table(mine, budget) -> list:
    """One budget's rows of the search experiment, and whether the default beats the rule."""
    lines = [f"### {budget}", "", "| method | n | test top-1 % | test % before fine-tune | MACs kept % | "
             "params kept % | search training steps | search min | re-rank min | minutes per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    stats = {}
    for method in [m for m in SEARCH_METHODS if any(r["method"] == m for r in mine)] + sorted(
            {r["method"] for r in mine} - set(SEARCH_METHODS)):
        runs = [r for r in mine if r["method"] == method]
        test = 100 * np.array([r["test"] for r in runs])
        stats[method] = (test.mean(), test.std(), len(runs))
        lines.append(f"| {method} | {len(runs)} | {spread(test)} | {spread([r['pruned_test'] for r in runs], 100)} "
                     f"| {spread([r['macs_ratio'] for r in runs], 100, 1)} | "
                     f"{spread([r['params_ratio'] for r in runs], 100, 1)} | "
                     f"{spread([r['search_training_steps'] for r in runs], 1, 0)} | "
                     f"{spread([_minutes(r.get('seconds_search')) for r in runs], 1, 1)} | "
                     f"{spread([_minutes(r.get('seconds_rerank')) for r in runs], 1, 1)} | "
                     f"{spread([r['seconds_total'] / 60 for r in runs], 1, 1)} |")
    for name in [n for n in ROW_NOTES if n in stats]:
        lines += ["", f"`{name}`: {ROW_NOTES[name]}."]
    lines.append("")
    lines += _rerank_leads([r for r in mine if r["method"] == "default" and r.get("rerank")])
    if {"default", "uniform"} <= set(stats):
        (mean, std, n), (rule, rule_std, m) = stats["default"], stats["uniform"]
        margin = 2 * max(std, rule_std)
        verdict = ("yes" if mean - rule > margin else "no") if min(n, m) > 1 else "not yet (one seed)"
        lines += [f"default − uniform rule: {mean - rule:+.2f} points; above two standard deviations "
                  f"({margin:.2f}): {verdict}.", ""]
    return lines


def _rerank_leads(runs) -> list:
    """What K re-ranked candidates buy: the best 128-step top-1 among the search's k best distinct policies minus
    the rule's, in points, for each k the default's records re-ranked."""
    if not runs:
        return []
    leads = {}
    for run in runs:
        rule = next(c["finetuned_top1"] for c in run["rerank"] if c["name"].endswith("uniform rule"))
        ranked = sorted((int(re.search(r"#(\d+)", c["name"]).group(1)), c["finetuned_top1"])
                        for c in run["rerank"] if c["name"].startswith("search #"))
        for k in range(1, len(ranked) + 1):
            leads.setdefault(k, []).append(max(score for _, score in ranked[:k]) - rule)
    return ["`default`'s re-rank, best of the search's k best policies (128-step top-1 minus the rule's, "
            "points): " + ", ".join(
                f"k={k} {spread(values, 100)} (n={len(values)})" for k, values in sorted(leads.items())) + ".", ""]


def _minutes(seconds):
    """Minutes of a recorded duration; None where the record has none (written before it was recorded)."""
    return None if seconds is None else seconds / 60


def _network(record) -> str:
    """The network a search-experiment record compressed (records from before the field: ResNet-20)."""
    return record.get("network", "resnet20_fashion_mnist")


def _network_title(network, rows) -> str:
    """'resnet20_fashion_mnist (dense 92.70%)': the dense network's test top-1 as its records give it, else the
    shipped baseline's (records written before they held it)."""
    dense = next((r["dense_test"] for r in rows if _network(r) == network and "dense_test" in r), None)
    summary = ROOT / "agmc_jax" / "baselines" / network / "summary.json"
    if dense is None and summary.is_file():
        dense = json.loads(summary.read_text()).get("test_acc")
    return f"{network} (dense {100 * dense:.2f}%)" if dense is not None else network


def _changed(default, rows) -> list:
    """(option, value) of a `default` record's config that differ from the other methods' records (the budget and
    the seed aside: every row has its own; an option the other records lack is newer than they are)."""
    reference = next((r["config"] for r in rows if r["method"] != "default"), {})
    config = dict(default.get("config", {}))
    if "criterion" in config and config["criterion"] is None:  # None: the kind's default, named as the run used it
        config["criterion"] = default_criterion(config["method"], config.get("kind"))
    return [(k, v) for k, v in config.items()
            if k not in ("method", "seed", "target_macs", "target_params") and k in reference and reference[k] != v]


def search_headline(rows) -> str:
    """The README's table: test top-1 after the fine-tune, per network, budget and method."""
    link = "docs/results/search_experiment.md"
    if not rows:
        return f"No run has finished yet ([results page]({link}))."
    methods = [m for m in SEARCH_METHODS if any(r["method"] == m for r in rows)]
    dates = sorted({r["date"] for r in rows if r.get("date")})
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    tested = ", ".join(sorted({f"`{k}={v}`" for r in rows if r["method"] == "default" for k, v in _changed(r, rows)}))
    lines = ["| network | budget | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for net, budget in sorted({(_network(r), r["budget"]) for r in rows}):
        cells = []
        for method in methods:
            runs = [r["test"] for r in rows if _network(r) == net and r["budget"] == budget and r["method"] == method]
            cells.append(f"{spread(runs, 100)} (n={len(runs)})" if runs else "—")
        lines.append(f"| {_network_title(net, rows)} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [
        "", f"Fashion-MNIST, test top-1 % after the same fine-tune, mean ± std over n "
            f"seeds; `default` is `agmc compress`'s defaults ({tested or 'none'} beyond the other rows'; "
            f"[why](docs/defaults.md)). {len(rows)} runs, "
            f"{' to '.join(dict.fromkeys([dates[0], dates[-1]])) if dates else 'undated'}, "
            f"{'; '.join(machines) or 'machine not recorded'}: [details and commands]({link})."])


def search_settings_page(rows) -> str:
    lines = _header("Episodes and exploration of the default search (issue #22)", "search_settings.py",
                    "The default search of `agmc compress` with one setting changed; its best policy and the "
                    "uniform rule's re-ranked by the default 128 masked SGD steps (top-1 on the 1,000 reward "
                    "images). `lead`: the best policy's 128-step top-1 minus the rule's, in points; `exported`: "
                    "in how many seeds the re-rank would export the searched policy (it keeps the rule unless the "
                    "lead passes one standard error of the difference). Mean ± standard deviation over seeds "
                    "(population). No final fine-tune.", rows)
    if not rows:
        return "\n".join(lines)
    for net, budget in sorted({(r["network"], r["budget"]) for r in rows}):
        mine = [r for r in rows if r["network"] == net and r["budget"] == budget]
        milestones = sorted({int(m) for r in mine for m in r["best_reward_by_episode"]})
        lines += [f"## {net}, {budget}", "", "| setting | fields | n | " + " | ".join(
            f"best reward by episode {m}" for m in milestones) + " | search #1's 128-step top-1 % | rule's % | "
            "lead (points) | exported | search min |", "|---" * (len(milestones) + 8) + "|"]
        for setting in dict.fromkeys(r["setting"] for r in sorted(mine, key=lambda r: (r["episodes"], r["setting"]))):
            runs = [r for r in mine if r["setting"] == setting]
            lines.append(
                f"| {setting} | `{json.dumps(runs[0]['fields'])}` | {len(runs)} | " + " | ".join(
                    spread([r["best_reward_by_episode"].get(str(m)) for r in runs], 1, 3) for m in milestones)
                + f" | {spread([r['search_top1'] for r in runs], 100)} | {spread([r['rule_top1'] for r in runs], 100)}"
                f" | {spread([r['lead'] for r in runs], 100)} | "
                f"{sum(not r['exported'].endswith('uniform rule') for r in runs)} of {len(runs)} | "
                f"{spread([r['seconds_search'] / 60 for r in runs], 1, 1)} |")
        lines.append("")
    return "\n".join(lines)


def bf16_page(rows) -> str:
    lines = ["# bfloat16 against float32 (issue #24)", "",
             f"Rendered by `{REFRESH}` from `experiments/results/bf16/` (each file the `summary.json` of an "
             "`agmc train` run, with its command); do not edit by hand. ResNet-20, one epoch of Fashion-MNIST.", ""]
    if not rows:
        return "\n".join(lines + ["No record yet.", ""])
    lines += provenance(rows, "agmc train --model resnet20 --dataset fashion_mnist --epochs 1 --dtype DTYPE ...")
    lines += ["| dtype | n | test top-1 % | validation top-1 % | train loss | seconds |", "|---|---|---|---|---|---|"]
    for dtype in sorted({_dtype(r) for r in rows}):
        runs = [r for r in rows if _dtype(r) == dtype]
        lines.append(f"| {dtype} | {len(runs)} | {spread([r.get('test_acc') for r in runs], 100)} | "
                     f"{spread([r.get('val_acc') for r in runs], 100)} | {spread([r.get('train_loss') for r in runs], 1, 3)} | "
                     f"{spread([r.get('seconds') for r in runs], 1, 0)} |")
    return "\n".join(lines + ["", "Seconds: the wall time of one run each on a shared machine; see [running at "
                                  "scale](../at_scale.md) for what bfloat16 is for.", ""])


def _dtype(record) -> str:
    found = re.search(r"--dtype\s+(\S+)", record.get("command", ""))
    return found.group(1) if found else Path(record["_file"]).stem


def compare_autocompress_page(rows) -> str:
    lines = _header("AutoCompress against annealing, AGMC, AMC and the uniform rule", "compare_autocompress.py",
                    "Every network gets the same masked fine-tune; test top-1 on the test split. Mean ± std over "
                    "seeds.")
    main = [r for r in rows if not r["name"].startswith("ultra/")]
    ultra = [r for r in rows if r["name"].startswith("ultra/")]
    if not rows:
        return "\n".join(lines + ["No run recorded here yet (earlier runs are in the [notes](../notes.md)).", ""])
    lines += provenance(rows, documented_command("compare_autocompress.py"))
    lines += ["| budget | method | n | MACs kept % | params kept % | test % before fine-tune | test % after | "
              "training steps before fine-tune | minutes per run |", "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in main:
        budget, _, run = r["name"].partition("/")
        groups.setdefault((budget, run.rsplit("_seed", 1)[0]), []).append(r)
    for (budget, method), runs in sorted(groups.items()):
        lines.append(f"| {budget} | {method} | {len(runs)} | {spread([r['macs'] for r in runs], 100)} | "
                     f"{spread([r['params'] for r in runs], 100)} | {spread([r['pruned_test'] for r in runs], 100)} | "
                     f"{spread([r['test'] for r in runs], 100)} | {spread([r['trained_before'] for r in runs], 1, 0)} | "
                     f"{spread([r['seconds'] / 60 for r in runs], 1, 1)} |")
    if ultra:
        lines += ["", "## Ultra-high regime", "", "| run | n | params kept % | test % |", "|---|---|---|---|"]
        groups = {}
        for r in ultra:
            groups.setdefault(r["name"].split("/", 1)[1].rsplit("_seed", 1)[0], []).append(r)
        for name, runs in sorted(groups.items()):
            lines.append(f"| {name} | {len(runs)} | {spread([r['params'] for r in runs], 100)} | "
                         f"{spread([r['test'] for r in runs], 100)} |")
    return "\n".join(lines + [""])


def compare_methods_page(rows) -> str:
    lines = _header("Search methods on one network", "compare_methods.py",
                    "Per method: the best reward after each mark, its policy on the whole validation split, then "
                    "slimmed and fine-tuned. Mean ± std over seeds.")
    if not rows:
        return "\n".join(lines + ["No run recorded here yet (earlier runs are in the [notes](../notes.md)).", ""])
    for run in rows:
        marks = run["args"]["marks"].split(",")
        lines += [f"## {run['_file']}", "", *provenance([run], documented_command("compare_methods.py")),
                  "| method | n | " + " | ".join(f"best reward @{m}" for m in marks)
                  + " | pruned val % | MACs kept % | fine-tuned val % | fine-tuned test % |",
                  "|---" * (len(marks) + 6) + "|"]
        for method, seeds in run["searches"].items():
            lines.append(f"| {method} | {len(seeds)} | " + " | ".join(spread([s["best"][m] for s in seeds], 1, 4)
                                                                    for m in marks)
                         + f" | {spread([s['pruned_val_acc'] for s in seeds], 100)} | "
                           f"{spread([s['macs_ratio'] for s in seeds], 100)} | "
                           f"{spread([s['val_acc'] for s in seeds], 100)} | {spread([s['test_acc'] for s in seeds], 100)} |")
        lines.append("")
    return "\n".join(lines)


def quantize_page(rows) -> str:
    lines = _header("Mixed precision against uniform bit widths", "quantize.py",
                    "Packed sizes on disk; every quantized network gets the same quantization-aware fine-tune. "
                    "Mean ± std over seeds.")
    if not rows:
        return "\n".join(lines + ["No run recorded here yet (earlier runs are in the [notes](../notes.md)).", ""])
    for run in rows:
        lines += [f"## {run['_file']}", "", *provenance([run], documented_command("quantize.py")),
                  "| network / policy | n | packed bytes | test % quantized | test % after QAT |", "|---|---|---|---|---|"]
        for name, seeds in run["rows"].items():
            lines.append(f"| {name} | {len(seeds)} | {spread([s['bytes'] for s in seeds], 1, 0)} | "
                         f"{spread([s['ptq_test_acc'] for s in seeds], 100)} | "
                         f"{spread([s['qat_test_acc'] for s in seeds], 100)} |")
        lines.append("")
    return "\n".join(lines)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return _cell(value)


def _table(rows) -> list:
    """Markdown lines of a table of dicts: every column whose values are all plain."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row)
            if not k.startswith("_") and k not in ("command", "date", "machine", "args")
            and all(isinstance(row.get(k), (str, int, float, bool, type(None))) for row in rows)]
    return ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|",
            *["| " + " | ".join(_value(row.get(k, "")) for k in keys) + " |" for row in rows]]


def bench_page(name: str, title: str, intro: str):
    """A page of every run of a benchmark, newest first: its rows as they were written, then any other list of
    records it holds (bench_input's decoders) as a table of its own."""
    def page(rows) -> str:
        lines = _header(title, f"{name}.py", intro + " Timings from a shared machine: compare rows of one run only.")
        if not rows:
            return "\n".join(lines + ["No run recorded here yet (earlier runs are in the [notes](../notes.md)).", ""])
        for run in reversed(rows):
            extra = [(key, value) for key, value in run.items() if key != "rows" and isinstance(value, list)
                     and value and all(isinstance(item, dict) for item in value)]
            lines += [f"## {run['_file']}", "", *provenance([run], documented_command(f"{name}.py")),
                      *_table(run.get("rows", [run])),
                      *[line for key, value in extra for line in ("", f"{key}:", "", *_table(value))],
                      *[f"\n{_cell(note)}" for note in run.get("notes", [])], ""]
        return "\n".join(lines)
    return page


PAGES = {  # experiment folder -> (page title for the index, renderer)
    "search_experiment": ("default `agmc compress` against the uniform rule, AMC, random, annealing",
                          search_experiment_page),
    "search_settings": ("episodes and exploration of the default search", search_settings_page),
    "bf16": ("bfloat16 against float32 training", bf16_page),
    "bf16_reward": ("the search's reward in bfloat16 against float32",
                    bench_page("bf16_reward", "The search's reward in bfloat16", "The same policies scored by the "
                               "reward in float32 and in bfloat16 (issue #24): Kendall tau and Spearman rho of the "
                               "two rankings, the largest change, whether the best policy stays the best.")),
    "compare_autocompress": ("AutoCompress against the one-shot methods", compare_autocompress_page),
    "compare_methods": ("search methods on one network at one budget", compare_methods_page),
    "quantize": ("mixed precision against uniform bit widths", quantize_page),
    "bench_search": ("search speed: an episode against the evaluation it scores",
                     bench_page("bench_search", "Search speed", "Compiled episodes against the dense evaluation "
                                "they score (`ratio`), per method and phase.")),
    "bench_slim": ("inference latency, dense against slimmed",
                   bench_page("bench_slim", "Latency of slimmed networks", "Dense folded over slim folded (`speedup`), "
                              "medians of interleaved calls.")),
    "bench_input": ("input pipeline throughput",
                    bench_page("bench_input", "Input pipeline throughput", "Images per second through the training "
                               "input pipelines (NumPy, grain with 0, 1, 2 workers).")),
    "bench_train": ("training and evaluation throughput",
                    bench_page("bench_train", "Training throughput", "Images per second of the compiled train and "
                               "evaluation steps (and a PyTorch twin with `--vs-torch`).")),
}


def pages() -> dict:
    """PAGES, and a generic page for every other folder of results (rows as they were written)."""
    others = sorted(p.name for p in RESULTS.iterdir() if p.is_dir() and p.name not in PAGES
                    and p.name != "proxy_study") if RESULTS.is_dir() else []
    return {**PAGES, **{name: (f"`{name}`", bench_page(name, name, f"Written by `experiments/{name}.py`."))
                        for name in others}}


def proxy_counts() -> dict:
    """{budget: policies} of the proxy study's JSON records (its fine-tune replicates apart)."""
    counts = {}
    for record in records("proxy_study", "*/*.json"):
        if "replicate_of" not in record:
            counts[record["budget"]] = counts.get(record["budget"], 0) + 1
    return counts


def index_page(rendered: dict) -> str:
    lines = ["# Results", "",
             f"Every experiment under `experiments/` writes JSON under `experiments/results/<experiment>/`; "
             f"`{REFRESH}` renders these pages and the README's headline table from those files alone "
             "(`tests/test_docs.py` fails when a page and its JSON differ). Measurements made before the "
             "experiments wrote JSON are kept, with their commands, in the [notes](../notes.md).", "",
             "| experiment | runs recorded | dates | page |", "|---|---|---|---|"]
    counts = proxy_counts()
    proxy = records("proxy_study", "*/*.json")
    lines.append(f"| which cheap score predicts the fine-tuned accuracy (`proxy_study.py`) | "
                 f"{sum(counts.values())} policies | {_dates(proxy)} | [proxy study](../proxy_study.md) |")
    for name, (title, _) in pages().items():
        rows = rendered[name]
        lines.append(f"| {title} (`{'agmc train' if name == 'bf16' else name + '.py'}`) | {len(rows)} | "
                     f"{_dates(rows)} | [{name}]({name}.md) |")
    return "\n".join(lines + [""])


def _dates(rows) -> str:
    dates = sorted({r["date"] for r in rows if r.get("date")})
    return " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "—"


def _readme(text: str, table: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the marker comments {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1]


def rendered_files(with_cli: bool = True) -> dict:
    """{path: the text it should hold} of every generated file."""
    data = {name: records(name, "*/*/*/seed*.json" if name == "search_experiment" else "**/*.json") for name in pages()}
    files = {DOCS / "results" / "index.md": index_page(data)}
    files.update({DOCS / "results" / f"{name}.md": render(data[name]) for name, (_, render) in pages().items()})
    files[README] = _readme(README.read_text(), search_headline(data["search_experiment"]))
    if with_cli:
        files[DOCS / "cli.md"] = cli_markdown()
    return files


def stale_proxy_study() -> list:
    """Budgets whose policy count in docs/proxy_study.md differs from the JSON records."""
    page = DOCS / "proxy_study.md"
    shown = dict(re.findall(r"^## (\S+): (\d+) policies", page.read_text(), re.M)) if page.exists() else {}
    return [f"{budget}: {count} policies recorded, {shown.get(budget, 'none')} on the page"
            for budget, count in sorted(proxy_counts().items()) if str(count) != shown.get(budget)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming every stale file")
    parser.add_argument("--proxy-study", action="store_true",
                        help="also regenerate docs/proxy_study.md with experiments/proxy_study.py --report")
    args = parser.parse_args()
    stale = []
    for path, text in rendered_files().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if args.proxy_study and not args.check:
        subprocess.run([sys.executable, *PROXY_REPORT.split()[1:]], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    proxy = stale_proxy_study()
    if args.check:
        problems = [f"{path} is stale: run `{REFRESH}`" for path in stale]
        problems += [f"docs/proxy_study.md is stale ({p}): run `{PROXY_REPORT}`" for p in proxy]
        print("\n".join(problems) or "every generated page is up to date")
        sys.exit(1 if problems else 0)
    print("\n".join(f"wrote {path}" for path in stale) or "every generated page was up to date")
    if proxy:
        print(f"docs/proxy_study.md is stale ({'; '.join(proxy)}): run `{PROXY_REPORT}`")


if __name__ == "__main__":
    main()
