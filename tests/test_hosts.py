"""Many hosts: `agmc train` as 2 processes x 2 CPU devices joined by jax.distributed (gloo) against 1 process x 4
devices on the same data, and a run stopped in one layout resumed in the other."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from agmc_jax.train import load_trained

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--plugin", "tests.fmnist_subset", "train", "--model", "lenet5", "--dataset", "fmnist_subset",
         "--epochs", "2", "--batch-size", "32", "--lr", "0.05"]
# Gloo sums the gradients of the two processes in another order than one process sums its 4 devices': a step
# agrees to ~3e-7, 32 steps of LeNet-5 drift to ~5e-4 (measured), so the variables are compared at that scale.
DRIFT = 2e-3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agmc(args, devices, extra_env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(args):
    """Run `agmc` as 2 processes of 2 devices; returns process 0's stdout."""
    port = _port()
    procs = [_agmc(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *args], 2)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "{" not in outputs[1][0]  # only process 0 prints the summary (gloo itself may print its connections)
    return outputs[0][0]


def _one_process(args):
    proc = _agmc(args, 4)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def _close(a, b):
    for x, y in zip(jax.tree.leaves(load_trained(a)[1]), jax.tree.leaves(load_trained(b)[1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=DRIFT)


def test_two_processes_train_as_one_process_of_four_devices(tmp_path):
    two = _summary(_two_processes([*TRAIN, "--workdir", str(tmp_path / "two")]))
    one = _summary(_one_process([*TRAIN, "--workdir", str(tmp_path / "one")]))
    assert (two["step"], two["test_count"]) == (one["step"], one["test_count"]) == (32, 128)
    assert abs(two["test_acc"] - one["test_acc"]) <= 2 / 128 and abs(two["train_loss"] - one["train_loss"]) < 1e-3
    _close(tmp_path / "two", tmp_path / "one")
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "one").iterdir())  # one writer: no doubled files
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


STOP_AFTER_ONE = """
import sys
from agmc_jax.cli import main
import agmc_jax.train as train
original = train.train
train.train = lambda *args, **kwargs: original(*args, **{**kwargs, "stop_after": 1})
main(sys.argv[1:])
"""


def test_a_run_stopped_in_one_layout_resumes_in_the_other(tmp_path):
    """Epoch 1 as 2 processes (stopped there, as a killed run), epoch 2 as 1 process of 4 devices: the uninterrupted
    run's variables; and the other way round."""
    _one_process([*TRAIN, "--workdir", str(tmp_path / "reference")])
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-c", STOP_AFTER_ONE, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), *TRAIN, "--workdir",
                               str(tmp_path / "a")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    _one_process([*TRAIN, "--workdir", str(tmp_path / "a")])
    _close(tmp_path / "a", tmp_path / "reference")


def test_two_processes_search_as_one_process_of_four_devices(tmp_path):
    """`agmc search` (AMC's DDPG) with the reward images split over 2 processes plays the history of 1 process of
    4 devices: the same policies, rewards and best policy, one writer of the outputs."""
    search = ["search", "--workdir", str(ROOT / "agmc_jax" / "baselines" / "lenet5_fashion_mnist"), "--method", "amc",
              "--episodes", "6", "--reward-images", "200", "--target-macs", "0.5"]
    _two_processes([*search, "--out", str(tmp_path / "two")])
    _one_process([*search, "--out", str(tmp_path / "one")])

    def history(out):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (out / "episodes.jsonl").read_text().splitlines()]

    assert history(tmp_path / "two") == history(tmp_path / "one") and len(history(tmp_path / "one")) == 6
    assert json.loads((tmp_path / "two" / "policy.json").read_text()) == \
        json.loads((tmp_path / "one" / "policy.json").read_text())


def test_bad_process_options_are_one_line(capsys):
    from agmc_jax.cli import main

    for argv, words in ((["--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "5"], "[0, 2)"),
                        (["--coordinator", "127.0.0.1:9"], "go together"), (["--process-id", "-1"], "--process-id"),
                        *((["--coordinator", address, "--num-processes", "1", "--process-id", "0"], "HOST:PORT")
                          for address in ("localhost:notaport", "localhost:0", "localhost:70000", "localhost",
                                          ":1234", "a b:12", "localhost:12:34", "[::1:12"))):
        try:
            main([*argv, "summary", "--model", "lenet5"])
            status = 0
        except SystemExit as exit:
            status = exit.code
        err = capsys.readouterr().err
        assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_place_puts_each_shard_where_the_sharding_says():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from agmc_jax.hosts import place

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    tree = {"split": np.arange(8.0 * len(jax.devices())).reshape(-1, 2), "whole": {"a": np.ones(3)}}
    placed = place(tree, {"split": NamedSharding(mesh, P("data")), "whole": NamedSharding(mesh, P())})
    np.testing.assert_array_equal(np.asarray(placed["split"]), tree["split"])
    assert placed["split"].sharding.spec == P("data") and placed["whole"]["a"].sharding.spec == P()


def test_processes_started_with_different_options_stop_in_one_line(tmp_path):
    port = _port()
    procs = [_agmc(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "search",
                    "--workdir", str(ROOT / "agmc_jax" / "baselines" / "lenet5_fashion_mnist"), "--out",
                    str(tmp_path / "s"), "--method", "random", "--episodes", str(4 + i)], 2) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.startswith("agmc")]
        assert proc.returncode == 2 and lines == [lines[0]] and "process 1 was started with other options" in lines[0]
    assert not (tmp_path / "s").exists()
