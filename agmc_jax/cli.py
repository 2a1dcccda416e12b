"""The `agmc` command: summary, train, evaluate, prune, search, finetune, compress, export, reproduce.

Every user mistake is one line on stderr and exit status 2: an `AgmcError` from the library, or an
option that does not parse or is out of range (checked where it is parsed, naming the option).
Warnings are one line each too.
"""
import argparse
import json
import math
import os
import signal
import sys
import warnings

from agmc_jax import interrupts
from agmc_jax.compression import COMPRESS_OPTIONS
from agmc_jax.env import REWARDS
from agmc_jax.errors import AgmcError, InputShapeError, UsageError
from agmc_jax.kinds import KINDS, describe_kind_options
from agmc_jax.search.registry import describe_methods
from agmc_jax.search.rerank import RERANK_STEPS
from agmc_jax.stages import describe_stages
from agmc_jax.train import DTYPES


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage lines) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite `kind` in the given range (the error names the option through argparse)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            span = (f" in {left}{low}, {high}{right}" if high is not None
                    else f" {'above' if low_open else 'at least'} {low}" if low is not None else "")
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a finite number'}{span}, "
                                             f"got {text}")
        return value
    return parse


_COUNT = _number(int, low=1)  # episodes, epochs, images, batch sizes, classes
_NATURAL = _number(int, low=0)  # warm-up lengths
_SEED = _number(int, low=0, high=2 ** 32 - 1)  # what NumPy's and JAX's generators take
_POSITIVE = _number(float, low=0, low_open=True)  # learning rates, width multipliers
_FRACTION = _number(float, low=0, high=1, low_open=True, high_open=True)  # budgets
_RATIO = _number(float, low=0, high=1, low_open=True)  # keep ratios, decay factors
_BITS = _number(int, low=1, high=16)  # weight bit widths


def _stages(text):
    """`--stages`: compress stages, comma-separated, each once (run in the registry's order)."""
    from agmc_jax.stages import ordered_stages

    try:
        return ordered_stages(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _one_line_warnings(command):
    """`warnings.showwarning` for `agmc command`: each warning one line on stderr, like errors."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"agmc {command}: warning: {message}", file=sys.stderr if file is None else file)
    return show


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W,C (e.g. 32,32,3), got {text!r}") from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected H,W,C (e.g. 32,32,3), got {text!r}")
    return shape


def _model_kwargs(args):
    """The zoo model's keyword arguments from `--width`, checked against the model (only MobileNets take it)."""
    from agmc_jax.models import create_model

    kwargs = {"width": args.width} if args.width is not None else {}
    try:
        create_model(args.model, args.classes, **kwargs)
    except TypeError:
        raise UsageError(f"--width applies to mobilenet_v1 and mobilenet_v2; {args.model} has no width "
                         "multiplier") from None
    return kwargs


def cmd_summary(args):
    from agmc_jax.graph import trace
    from agmc_jax.models import check_input_shape, create_model, model_spec
    from agmc_jax.report import layer_table

    shape = check_input_shape(args.model, args.input or model_spec(args.model).input_shape)
    module = create_model(args.model, args.classes, **_model_kwargs(args))
    variables = _abstract_variables(module, shape)
    net = trace(module, variables, shape)
    summary = net.summary()
    summary["model"] = args.model
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(layer_table(net))


def _abstract_variables(module, shape):
    import jax
    import numpy as np

    try:
        return jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, *shape), np.float32)))
    except (TypeError, ValueError) as error:
        raise InputShapeError(f"the network cannot take inputs of shape {shape}: {str(error).splitlines()[0]}") from error


def cmd_train(args):
    from agmc_jax.networks import load_network
    from agmc_jax.train import TrainConfig, train

    config = TrainConfig(model=args.model, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                         warmup_epochs=args.warmup_epochs, seed=args.seed, data_dir=args.data_dir,
                         input_shape=args.input, num_classes=args.classes, dtype=args.dtype,
                         data_workers=args.data_workers, checkpoint_steps=args.checkpoint_steps,
                         model_kwargs=_model_kwargs(args))
    variables = load_network(args.init_from)[1] if args.init_from else None
    print(json.dumps(train(config, args.workdir, variables=variables), indent=1))


def cmd_evaluate(args):
    from agmc_jax.networks import evaluate_network

    print(json.dumps(evaluate_network(args.workdir, args.split, args.data_dir), indent=1))


def cmd_prune(args):
    from agmc_jax.networks import prune_uniform

    print(json.dumps(prune_uniform(args.workdir, args.keep, args.criterion, args.out, args.data_dir,
                                   args.recalibrate_bn, args.round_to), indent=1))


def cmd_search(args):
    from agmc_jax.pipeline import run_search, search_options

    result = run_search(args.workdir, args.out, **search_options(args, args.resume))
    print(json.dumps({k: v for k, v in result.policy().items() if k not in ("steps", "layers")}, indent=1))


def cmd_finetune(args):
    from agmc_jax.pipeline import finetune

    print(json.dumps(finetune(args.search_dir, epochs=args.epochs, learning_rate=args.lr,
                              data_workers=args.data_workers), indent=1))


def cmd_compress(args):
    from agmc_jax.compression import CompressConfig, compress

    compress(CompressConfig.from_options(args), args.out, workdir=args.workdir, resume=args.resume)


def cmd_export(args):
    from agmc_jax.networks import final_network, load_network
    from agmc_jax.portable import export_network

    source = final_network(args.network)
    module, variables, config = load_network(source)
    description = export_network(module, variables, tuple(config["input_shape"]), args.out)
    print(json.dumps({"network": str(source), "out": args.out, **description}, indent=1))


DATA_WORKERS_HELP = ("processes that decode and augment the training images (0: in the training process; default: "
                     "0 for data held in memory, else the cores but one, at most 16)")
ROUND_TO_HELP = ("round channel counts to multiples of this (default: 8 for groups of 16 channels or more, "
                 "exact below; --round-to 1: exact everywhere)")


def cmd_reproduce(args):
    import contextlib

    from agmc_jax.data import mock_data
    from agmc_jax.reproduce import load_config, reproduce

    config = load_config(args.config, args.set)
    with mock_data(args.mock_data) if args.mock_data else contextlib.nullcontext():
        print(json.dumps(reproduce(config, args.workdir, args.data_dir), indent=1))


def _search_arguments(parser, methods_help="", defaults=None):
    """The search's options; `defaults` (`agmc compress`'s: COMPRESS_OPTIONS) replace the screening search's."""
    defaults = defaults or {}
    parser.add_argument("--method", default="agmc", help=describe_methods() + methods_help)
    parser.add_argument("--target-macs", type=_FRACTION, default=None, help="MACs budget as a fraction (0, 1)")
    parser.add_argument("--target-params", type=_FRACTION, default=None, help="parameter budget as a fraction (0, 1)")
    parser.add_argument("--episodes", type=_COUNT, default=100)
    parser.add_argument("--seed", type=_SEED, default=0)
    parser.add_argument("--reward", default="acc", help="; ".join(f"{name}: {r.description}"
                                                                  for name, r in REWARDS.items()))
    parser.add_argument("--reward-steps", type=_COUNT, default=None,
                        help="finetuned reward: SGD steps of masked fine-tuning per candidate (default 32)")
    parser.add_argument("--reward-lr", type=_POSITIVE, default=None,
                        help="finetuned reward and re-rank: constant learning rate of that fine-tune (default 0.02)")
    parser.add_argument("--fill", action=argparse.BooleanOptionalAction, default=None,
                        help="raise every policy to the budget, so no layer could keep one more rounding step "
                             "(default: on; --no-fill leaves what the walled actions ask for)")
    rerank = parser.add_mutually_exclusive_group()
    rerank.add_argument("--rerank", type=_COUNT, default=defaults.get("rerank", 0), metavar="K",
                        help="score the K best distinct policies and the uniform rule's by --rerank-steps of masked "
                             "fine-tuning and keep the best (a rule's one policy is not re-ranked; default: "
                             f"{defaults.get('rerank') or 'off'})")
    rerank.add_argument("--no-rerank", dest="rerank", action="store_const", const=0,
                        help="keep the search's best policy as it is")
    parser.add_argument("--rerank-steps", type=_COUNT, default=RERANK_STEPS,
                        help=f"SGD steps of the re-rank's fine-tune per candidate (default {RERANK_STEPS})")
    parser.add_argument("--reward-images", type=_COUNT, default=1000, help="validation images scoring each policy")
    parser.add_argument("--reward-dtype", default="float32", choices=DTYPES,
                        help="compute dtype of the reward's evaluation: float32 | bfloat16 (accelerators; weights, "
                             "BatchNorm statistics and the export stay float32) | float16")
    parser.add_argument("--lbound", type=_RATIO, default=0.2, help="smallest keep ratio per group")
    parser.add_argument("--round-to", type=_COUNT, default=None, help=ROUND_TO_HELP)
    parser.add_argument("--criterion", default=defaults.get("criterion", "l2"),
                        help="which channels a count keeps: l1 | l2 | lstsq (l2, then least-squares refit) | "
                             "infodrop (information dropout learned on the reward images) (default: "
                             f"{defaults.get('criterion', 'l2') or 'lstsq for channels, else l2'})")
    parser.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="re-estimate each pruned network's BatchNorm statistics on 100 reward images "
                             "before scoring it (default: on)")
    parser.add_argument("--agent-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a field of the method's agent config, e.g. sigma_decay=0.99 or candidates=8 "
                             "(repeatable; an unknown name lists the valid ones)")
    parser.add_argument("--kind-option", action="append", default=[], metavar="KEY=VALUE",
                        help=f"an option of the compression kind ({describe_kind_options()}; repeatable)")
    parser.add_argument("--warmup-episodes", type=_NATURAL, default=None,
                        help="DDPG: episodes of random actions before learning (default: a quarter, at most 100)")
    parser.add_argument("--sigma-decay", type=_RATIO, default=None,
                        help="DDPG: exploration noise factor per episode after warm-up (default 0.95, AMC's)")


def parser():
    top = _Parser(prog="agmc", description="Automatic graph-based compression of CNNs in JAX. --plugin MODULE (before "
                                           "the command, repeatable; or $AGMC_PLUGINS) imports a module that "
                                           "registers methods, kinds, stages, rewards or models.")
    top.add_argument("--coordinator", metavar="HOST:PORT", help="many hosts: process 0's address (one process per "
                                                                  "host, each started with these three options)")
    top.add_argument("--num-processes", type=_COUNT, help="many hosts: how many processes the run has")
    top.add_argument("--process-id", type=_NATURAL, help="many hosts: this process's index, from 0")
    top.add_argument("--distributed", action="store_true",
                     help="many hosts, where the platform tells JAX the processes (Cloud TPU, SLURM)")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="per-layer table, parameters and MACs, traced from the program")
    p.add_argument("--model", required=True)
    p.add_argument("--input", type=_shape, help="H,W,C (default: the model's standard input)")
    p.add_argument("--classes", type=_COUNT)
    p.add_argument("--width", type=_POSITIVE, help="width multiplier (MobileNets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_summary)

    p = sub.add_parser("train", help="train a zoo network on a dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--epochs", type=_COUNT, default=30)
    p.add_argument("--workdir", required=True)
    p.add_argument("--batch-size", type=_COUNT, default=128)
    p.add_argument("--lr", type=_POSITIVE, default=0.1)
    p.add_argument("--weight-decay", type=_number(float, low=0), default=5e-4)
    p.add_argument("--schedule", default="cosine", help="cosine | onecycle")
    p.add_argument("--warmup-epochs", type=_NATURAL, default=0)
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--input", type=_shape)
    p.add_argument("--classes", type=_COUNT)
    p.add_argument("--width", type=_POSITIVE)
    p.add_argument("--data-dir")
    p.add_argument("--init-from", help="start from the variables of this trained workdir (same model)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16 (parameters, optimizer and "
                                                      "BatchNorm statistics stay float32; fine-tuning inherits it) | "
                                                      "float16")
    p.add_argument("--data-workers", type=_NATURAL, help=DATA_WORKERS_HELP)
    p.add_argument("--checkpoint-steps", type=_NATURAL, default=0,
                   help="also checkpoint every this many steps inside an epoch (default 0: at epoch ends only)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("evaluate", help="loss and accuracy of a trained or pruned network")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="test", help="train | validation | test")
    p.add_argument("--data-dir")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("prune", help="one keep ratio for every channel group (the handcrafted baseline)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--keep", type=_RATIO, required=True)
    p.add_argument("--round-to", type=_COUNT, default=None, help=ROUND_TO_HELP)
    p.add_argument("--criterion", default="l2", help="l1 | l2 | lstsq")
    p.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="re-estimate BatchNorm statistics on 256 validation images (default: on)")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("search", help="search per-group keep ratios under a budget")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir")
    _search_arguments(p)
    p.add_argument("--kind", help="search this compression kind instead of the method's: " + " | ".join(KINDS))
    p.add_argument("--target-size", type=_FRACTION, help="bits: size budget as a fraction of the float32 size")
    p.add_argument("--min-bit", type=_BITS, help="bits: fewest weight bits of a layer (default 2)")
    p.add_argument("--max-bit", type=_BITS, help="bits: most weight bits of a layer (default 8)")
    p.set_defaults(run=cmd_search)

    p = sub.add_parser("finetune", help="train the slimmed network of a search directory")
    p.add_argument("search_dir")
    p.add_argument("--epochs", type=_COUNT, default=3)
    p.add_argument("--lr", type=_POSITIVE, default=0.02)
    p.add_argument("--data-workers", type=_NATURAL, help=DATA_WORKERS_HELP)
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("compress", help="baseline -> search -> slim -> fine-tune -> report")
    p.add_argument("--workdir", required=True, help="a trained network (see `agmc train`)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--data-dir")
    p.add_argument("--finetune-epochs", type=_COUNT, default=1)
    p.add_argument("--lr", type=_POSITIVE, default=0.02)
    _search_arguments(p, "; autocompress: the autocompress stage in place of prune", COMPRESS_OPTIONS)
    p.add_argument("--kind", help="the prune stage's compression kind instead of the method's: "
                                  + " | ".join(k for k in KINDS if k != "bits"))
    p.add_argument("--stages", type=_stages, default=("prune",),
                   help="comma-separated, each once: " + describe_stages())
    p.add_argument("--quant-method", default="ppo", help="the bit-width search's method (ppo, haq, random, ...)")
    p.add_argument("--target-size", dest="quant_target_size", type=_FRACTION, default=0.25,
                   help="quantize: size budget as a fraction of the float32 size of the network it quantizes")
    p.add_argument("--min-bit", dest="quant_min_bit", type=_BITS, help="quantize: fewest weight bits (default 2)")
    p.add_argument("--max-bit", dest="quant_max_bit", type=_BITS, help="quantize: most weight bits (default 8)")
    p.add_argument("--qat-epochs", type=_COUNT, default=1, help="quantize: quantization-aware fine-tuning epochs")
    p.add_argument("--data-workers", type=_NATURAL, help="the fine-tunes' " + DATA_WORKERS_HELP)
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("export", help="write a network as a jax.export artifact that runs without its Python code")
    p.add_argument("network", help="a network directory, or the --out of `agmc compress` / `agmc search` (its last "
                                   "stage: quantized, fine-tuned or slim)")
    p.add_argument("--out", required=True, help="a new directory for model.stablehlo, weights.npz and export.json")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("reproduce", help="run a published setting: baseline training -> compress -> comparison")
    p.add_argument("config", help="a config file, e.g. experiments/configs/resnet56_cifar10.py")
    p.add_argument("--workdir", required=True, help="where the stages run and resume (baseline/, compress/)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set compress.episodes=50 (repeatable)")
    p.add_argument("--data-dir")
    p.add_argument("--mock-data", type=_COUNT, metavar="N",
                   help="dry run: every tfds split replaced by N random examples (tfds.testing.mock_data)")
    p.set_defaults(run=cmd_reproduce)
    return top


def _plugins(argv) -> list:
    """`argv` without its `--plugin MODULE` options, after importing each module (and those of $AGMC_PLUGINS,
    comma-separated): a plugin registers methods, kinds, stages, rewards or models before the parser lists them."""
    import importlib

    names = [n for n in os.environ.get("AGMC_PLUGINS", "").split(",") if n.strip()]
    rest = []
    argv = list(argv)
    while argv:
        item = argv.pop(0)
        if item == "--plugin" and argv:
            names.append(argv.pop(0))
        elif item.startswith("--plugin="):
            names.append(item.partition("=")[2])
        else:
            rest.append(item)
    if names and os.getcwd() not in sys.path:  # as `python -m`: a module of the working directory imports
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name.strip())
        except Exception as error:  # a missing or empty name, a relative one, or a plugin that fails as it loads
            print(f"agmc: error: --plugin {name.strip() or repr(name)} cannot be imported ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); give an importable module "
                  "name (from the working directory, or its directory on PYTHONPATH)", file=sys.stderr)
            sys.exit(2)
    return rest


def _join(args, watch: bool) -> bool:
    """Join a multi-process run when the command line (or $AGMC_COORDINATOR, $AGMC_NUM_PROCESSES,
    $AGMC_PROCESS_ID) says so; `--distributed` asks the platform. Returns whether it joined one. With `watch` (an
    `agmc` process) the command runs in a supervised child instead, and this process ends with it."""
    import os

    from agmc_jax.hosts import check_same_options, heartbeat_seconds, initialize
    from agmc_jax.supervisor import supervise, supervised

    def variable(name):
        text = os.environ.get(name)
        if text is not None and not text.strip().isdigit():
            raise UsageError(f"${name} must be a whole number, got {text!r}")
        return None if text is None else int(text)

    coordinator = args.coordinator or os.environ.get("AGMC_COORDINATOR")
    count = args.num_processes or variable("AGMC_NUM_PROCESSES")
    index = args.process_id if args.process_id is not None else variable("AGMC_PROCESS_ID")
    if coordinator or count is not None or index is not None or args.distributed:
        if watch and not supervised():  # this process watches a child that joins (a dead peer: one line)
            _exit(supervise(args.command, heartbeat_seconds()), False)
        initialize(coordinator, count, index)
        import jax

        options = {k: v for k, v in vars(args).items() if k not in ("run", "process_id", "coordinator")}
        check_same_options(json.dumps(options, sort_keys=True, default=str))
        if jax.process_index() != 0:  # process 0 reports; the others compute their part silently
            sys.stdout = open(os.devnull, "w")
        return True
    return False


def _exit(status: int, in_process: bool) -> None:
    """Exit with `status` (after the one error line, or when done). The `agmc` process ends at once: what the
    interpreter's teardown would run (a failed write's orbax tasks reporting their errors, progress bars redrawn)
    adds nothing but noise, and a Ctrl-C during it killed the process without its line; a caller of `main` in its
    own process gets `SystemExit`."""
    if in_process:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv=None):
    in_process, argv = argv is not None, _plugins(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    restore = interrupts.install(args.command, at_once=not in_process)
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command)
    joined = False
    try:
        joined = _join(args, not in_process)
        args.run(args)
    except AgmcError as error:
        print(f"agmc {args.command}: error: {error}", file=sys.stderr)
        _exit(2, in_process)
    except (KeyboardInterrupt, interrupts.Terminated) as stop:
        signum = signal.SIGTERM if isinstance(stop, interrupts.Terminated) else signal.SIGINT
        if not in_process:  # the `agmc` process ends at once
            interrupts.stop_now(signum)
        print(f"agmc {args.command}: {interrupts.INTERRUPTED}", file=sys.stderr)
        sys.exit(interrupts.STATUS[signum])
    except BrokenPipeError:  # the reader of stdout went away (`agmc summary | head -1`): nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush is not refused
        _exit(1, in_process)
    except OSError as error:  # a full disk, a read-only or vanished directory, met while writing
        where = f" {error.filename}" if getattr(error, "filename", None) else ""
        print(f"agmc {args.command}: error: cannot use{where}: {error.strerror or error}; free space or fix the "
              "path and rerun (with --resume where the command takes it)", file=sys.stderr)
        _exit(2, in_process)
    finally:
        warnings.showwarning = shown
        restore()
    if not in_process:  # done: the interpreter's teardown (seconds, with signals at their defaults) is skipped
        if joined:
            import jax

            jax.distributed.shutdown()
        _exit(0, in_process)


if __name__ == "__main__":
    main()
