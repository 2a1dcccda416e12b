"""Many hosts: `agmc train` as 2 processes x 2 CPU devices joined by jax.distributed (gloo) against 1 process x 4
devices on the same data, and a run stopped in one layout resumed in the other."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

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


NATIVE_ABORT = b"""E1207 10:56:27.338958   22839 coordination_service.cc:1549] [1] Use error polling to propagate the following \
error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error. [type.googleapis.com/tensorflow.CoordinationServiceError='']
F1207 10:56:27.339883   22850 client.h:80] Terminating process because the JAX distributed service detected fatal \
errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
agmc train: error: cannot write checkpoint w/checkpoints/96 (TimeoutError: Timed out while waiting for a barrier.)
*** Check failure stack trace: ***
    @     0x7f5c3fa40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""  # what a survivor wrote when its peer was killed (jax 0.10.2, gloo), its own last line included


def test_the_supervisor_passes_output_through_and_holds_jaxs_abort_for_one_line():
    """Progress bars and printed lines pass as they come; JAX's native log and the command's error line are held;
    from them the dead peer is named, or the lost coordinator; any other failure names nothing (its lines shown)."""
    import io

    from agmc_jax.supervisor import lost_peer, relay

    read, write = os.pipe()
    os.write(write, b"epoch 1 step 10\nsearch:  50%|#####     | 5/10\rsearch: 100%|##########| 10/10\n" + NATIVE_ABORT)
    os.close(write)
    shown = io.BytesIO()
    held = relay(read, shown)
    assert shown.getvalue() == b"epoch 1 step 10\nsearch:  50%|#####     | 5/10\rsearch: 100%|##########| 10/10\n"
    assert held == NATIVE_ABORT
    assert lost_peer(held, 60) == ("process 1 of the run stopped answering (no heartbeat for 60 s) and the others "
                                   "cannot go on without it")
    gone = (b"F1207 11:05:46.017436   28632 client.h:80] Terminating process because the JAX distributed service "
            b"detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either "
            b"the leader task died.\n\nRPC: /xla.coordination.CoordinationService/GetKeyValue\n")
    assert lost_peer(gone, 60) == ("lost the run's coordination service (UNAVAILABLE: Failed to send RPC to "
                                   "coordination service in GetKeyValue): process 0 died or cannot be reached")
    assert lost_peer(b"agmc train: error: something else\n", 60) is None


@pytest.mark.slow  # a minute of two processes starting on a loaded machine: run with -m slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_dead_peer_stops_the_other_process_in_one_line(tmp_path, victim):
    """`agmc train` as 2 processes; one is killed once training has started (its supervisor, and with it the child):
    the survivor stops within the heartbeat with one line naming what died, exit status 1."""
    port = _port()
    procs = [_agmc(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *TRAIN[:7],
                    "--epochs", "30", "--batch-size", "32", "--workdir", str(tmp_path / "w")], 2, {"AGMC_HEARTBEAT_SECONDS": "5"})
             for i in range(2)]
    deadline = time.time() + 300
    while not list((tmp_path / "w").glob("checkpoints/*")) and time.time() < deadline:
        time.sleep(0.2)
    procs[victim].kill()
    start = time.time()
    _, err = procs[1 - victim].communicate(timeout=120)
    lines = err.strip().splitlines()
    assert procs[1 - victim].returncode == 1 and len(lines) == 1, err[-3000:]
    assert ("process 1 of the run stopped answering" if victim else "process 0 died") in lines[0]
    assert time.time() - start < 60


@pytest.mark.slow  # four minutes here (a baseline, then three compress processes): run with -m slow
def test_two_processes_compress_as_one_process_of_four_devices(tmp_path):
    """`agmc compress` (random search, a re-rank, slim, fine-tune) as 2 processes writes the report of 1 process of 4
    devices: the same policy, candidates and costs, accuracies within the gloo drift; one writer."""
    _one_process([*TRAIN[:7], "--epochs", "1", "--batch-size", "32", "--workdir", str(tmp_path / "base")])
    compress = ["--plugin", "tests.fmnist_subset", "compress", "--workdir", str(tmp_path / "base"), "--method",
                "random", "--episodes", "4", "--reward-images", "64", "--target-macs", "0.5", "--rerank", "2",
                "--rerank-steps", "2", "--finetune-epochs", "1"]
    _two_processes([*compress, "--out", str(tmp_path / "two")])
    _one_process([*compress, "--out", str(tmp_path / "one")])
    two, one = (json.loads((tmp_path / out / "report.json").read_text()) for out in ("two", "one"))
    for report in (two, one):
        for wall_time in ("latency_ms_batch128", "seconds"):
            report.pop(wall_time)
    accuracies = two.pop("accuracy"), one.pop("accuracy")
    ranked = two.pop("rerank"), one.pop("rerank")  # scored after 2 SGD steps: gloo's drift may flip an image
    assert len(ranked[0]) == 2 and two == one
    for a, b in zip(*ranked, strict=True):
        assert a.pop("finetuned_top1") == pytest.approx(b.pop("finetuned_top1"), abs=2 / 64) and a == b
    for (stage, splits), (_, others) in zip(*(sorted(a.items()) for a in accuracies)):
        for split, value in splits.items():
            assert abs(value - others[split]) <= 2 / 128, (stage, split)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
