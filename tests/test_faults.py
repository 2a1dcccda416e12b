"""Killed anywhere, resumed, finished: real `agmc search` and `agmc compress` processes are SIGKILLed at
many points (inside orbax checkpoint writes, inside the writes of the exported networks, between
every two outputs, during the fine-tuning) and resumed with --resume until they finish; the outputs
must equal those of an uninterrupted run, and nothing half-written may remain.

The library's own checks of what it is given come last: labels it cannot score are refused.

A kill point is a path that the running process creates or replaces (polled every half millisecond),
so the process dies right after it appears: for a temporary directory, in the middle of the write. A
kill inside a write too short to be seen by polling (a JSON file, a PNG) leaves a hidden
`.NAME.partial` file, or a line cut short in episodes.jsonl; before each resume those leftovers are
planted as such a kill leaves them. The default run covers a subset of the kill points;
`pytest -m faults tests/test_faults.py` runs them all, plus kills at random times.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from agmc_jax import checkpoint, search
from agmc_jax.data.fashion_mnist import DEFAULT_IDX_DIR, IDX_FILES, idx_path, prepared_builder, read_idx
from agmc_jax.errors import DataError
from agmc_jax.models import create_model, init_model

BASELINE = Path(__file__).parents[1] / "agmc_jax" / "baselines" / "lenet5_fashion_mnist"
TRAIN_IMAGES, TEST_IMAGES = 5000 + 512, 500  # 512 training images after the 5,000 held out for validation
SEARCH = ("--method", "random", "--episodes", "25", "--reward-images", "200", "--seed", "1")  # chunks of 12
COMPRESS = ("--method", "uniform", "--reward-images", "200", "--finetune-epochs", "2")

# Kill points: glob patterns under the output directory, in the order a run meets them.
SEARCH_POINTS = {
    "first checkpoint, mid-write": "search_state/*orbax-checkpoint-tmp*",
    "after the first checkpoint": "search_state/12",
    "second checkpoint, mid-write": "search_state/*orbax-checkpoint-tmp*",
    "after the second checkpoint": "search_state/24",
    "last checkpoint, mid-write": "search_state/*orbax-checkpoint-tmp*",
    "after policy.json": "policy.json",
    "after rewards.png": "rewards.png",
    "after keep.png": "keep.png",
    "masked network, mid-write": ".masked.partial/variables",
    "after the masked network": "masked",
    "slim network, mid-write": ".slim.partial/variables",
    "after the slim network": "slim",
}
COMPRESS_POINTS = {
    "search checkpoint, mid-write": "search/search_state/*orbax-checkpoint-tmp*",
    "slim network, mid-write": "search/.slim.partial/variables",
    "after the slim network": "search/slim",
    "fine-tuning config written": "search/finetune/config.json",
    "first fine-tuning checkpoint, mid-write": "search/finetune/checkpoints/*orbax-checkpoint-tmp*",
    "after the first fine-tuning epoch": "search/finetune/checkpoints/4",
    "last fine-tuning checkpoint, mid-write": "search/finetune/checkpoints/*orbax-checkpoint-tmp*",
    "after the fine-tuning summary": "search/finetune/summary.json",
    "after the fine-tuned network's description": "search/finetune/network.json",
    "after report.json": "report.json",
}
QUICK_SEARCH = ("second checkpoint, mid-write", "after policy.json", "masked network, mid-write")
# The default suite's kill points (each a restart of the command): a fine-tune cut mid-write and one cut after
# its summary; every point, and random kills, run with -m faults.
QUICK_COMPRESS = ("first fine-tuning checkpoint, mid-write", "after the fine-tuning summary")
SMALL_WRITES = ("policy.json", "rewards.png", "keep.png", "report.json", "report.md", "search/policy.json",
                "search/rewards.png", "search/keep.png")
RANDOM_KILLS = 6
TIMING = ("seconds", "latency_ms_batch128")  # wall times: the only outputs two runs cannot share


def _write_idx(path, array):
    """An IDX file of unsigned bytes: two zero bytes, type 0x08, rank, big-endian sizes, data."""
    sizes = b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + sizes + np.ascontiguousarray(array, np.uint8).tobytes())


CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")  # set by conftest.py


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A small Fashion-MNIST (512 training, 5,000 validation, 500 test images), its own data cache, and the
    uninterrupted runs the killed ones must reproduce."""
    root = tmp_path_factory.mktemp("faults")
    idx = root / "idx"
    idx.mkdir()
    for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        for stem in IDX_FILES[split]:
            _write_idx(idx / stem, read_idx(idx_path(DEFAULT_IDX_DIR, stem))[:count])
    # without the tests' compilation cache (conftest.py): a process killed inside a write would leave a torn entry
    env = {**{k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}, "AGMC_TFDS_DIR": str(root / "tfds")}
    data = ("--workdir", str(BASELINE), "--data-dir", str(idx))
    reference = {"search": root / "reference_search", "compress": root / "reference_compress"}
    with pytest.MonkeyPatch.context() as patch:  # the data cache, prepared once for every run
        patch.setenv("AGMC_TFDS_DIR", env["AGMC_TFDS_DIR"])
        prepared_builder(str(idx))
    start = time.monotonic()
    runs = {"search": _start(["search", *data, *SEARCH, "--out", str(reference["search"])], env, root),
            "compress": _start(["compress", *data, *COMPRESS, "--out", str(reference["compress"])], env, root)}
    seconds = {}
    for command, run in runs.items():
        assert run.wait() == 0, (root / "stderr.log").read_text()[-3000:]
        seconds[command] = time.monotonic() - start
    return {"root": root, "env": env, "data": data, "reference": reference, "seconds": seconds}


def _start(argv, env, root):
    """`agmc argv` started in a subprocess; its stderr goes to root/stderr.log."""
    with open(root / "stderr.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                                stderr=log, cwd=Path(__file__).parents[1])


def _run(argv, env, root):
    """`agmc argv` to the end (exit status 0 checked)."""
    assert _start(argv, env, root).wait() == 0, (root / "stderr.log").read_text()[-3000:]


def _present(out, pattern):
    """(path, inode) of everything matching `pattern` under `out` now: a path replaced by a rename is new."""
    found = set()
    for path in out.glob(pattern):
        try:
            found.add((path, path.stat().st_ino))
        except FileNotFoundError:  # renamed or removed while listed
            continue
    return found


def _kill_when(argv, env, root, out, pattern, delay=None):
    """Run `agmc argv` and SIGKILL it once a path matching `pattern` appears under `out` (or after `delay`
    seconds); returns True if it was killed, False if it finished first (exit status 0 checked)."""
    before, start = _present(out, pattern) if pattern else set(), time.monotonic()
    process = _start(argv, env, root)
    while process.poll() is None:
        due = (time.monotonic() - start >= delay) if delay is not None else bool(_present(out, pattern) - before)
        if due:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.0005)
    assert process.returncode == 0, (root / "stderr.log").read_text()[-3000:]
    return False


def _plant_leftovers(out, reference):
    """What a kill inside one of the short writes leaves: half of each small file under its temporary
    name, and a line cut short at the end of episodes.jsonl."""
    for name in SMALL_WRITES:
        source = reference / name
        if source.exists() and (out / name).parent.is_dir():
            half = source.read_bytes()[:source.stat().st_size // 2]
            (out / name).with_name(f".{source.name}.partial").write_bytes(half)
    for log in out.glob("**/episodes.jsonl"):
        with open(log, "a") as file:
            file.write('{"episode": 99, "rew')


def _chain(setting, command, options, points=(), delay=None):
    """Kill `agmc command` at each point in turn (or once, `delay` seconds after it starts), resuming each
    time, then finish it; returns the output directory and how many kills happened."""
    root, env = setting["root"], setting["env"]
    out = root / f"{command}_{len(list(root.glob(command + '_*')))}"
    argv = [command, *setting["data"], *options, "--out", str(out)]
    kills = 0
    schedule = [(pattern, None) for pattern in points] if delay is None else [(None, delay)]
    for run, (pattern, seconds) in enumerate(schedule):
        if _kill_when(argv + ["--resume"] * (run > 0), env, root, out, pattern, seconds):
            kills += 1
            _plant_leftovers(out, setting["reference"][command])
    _run(argv + ["--resume"], env, root)
    return out, kills


def _network(path):
    """A saved network directory as comparable values: its description and its variables' arrays."""
    variables = checkpoint.restore(path / "variables")
    return (path / "network.json").read_text(), [np.asarray(leaf) for leaf in jax.tree.leaves(variables)]


def _without_timing(value):
    """A JSON value with its wall-time fields removed."""
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _outputs(out):
    """Everything a run leaves in `out` except its internal state (search and training checkpoints,
    TensorBoard events), as comparable values; a leftover temporary file shows up as an extra name."""
    internal = ("search_state", "checkpoints", "tb", "variables")
    values = {}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        if any(part in internal for part in path.relative_to(out).parts):
            continue
        if path.is_dir():
            values[name] = _network(path) if (path / "variables").is_dir() else "directory"
        elif name.endswith("network.json") and (path.parent / "variables").is_dir():
            continue  # compared with its network
        elif path.suffix in (".json", ".jsonl"):
            values[name] = [_without_timing(json.loads(line)) for line in path.read_text().splitlines()] \
                if path.suffix == ".jsonl" else _without_timing(json.loads(path.read_text()))
        elif path.suffix == ".md":
            values[name] = [line for line in path.read_text().splitlines()
                            if "latency" not in line and not line.startswith("Wall time")]
        else:
            values[name] = path.read_bytes()
    for trained in out.rglob("finetune/checkpoints"):
        values[f"{trained} latest"] = [np.asarray(leaf) for leaf in jax.tree.leaves(checkpoint.restore(trained))]
    return values


def _assert_same(out, reference):
    """The outputs of `out` equal those of the uninterrupted run, name by name and array by array."""
    got, want = _outputs(out), _outputs(reference)
    got = {k.replace(str(out), str(reference)): v for k, v in got.items()}
    assert sorted(got) == sorted(want)
    for name in want:
        if isinstance(want[name], tuple):
            assert got[name][0] == want[name][0], name
            assert all(np.array_equal(a, b) for a, b in zip(got[name][1], want[name][1], strict=True)), name
        elif isinstance(want[name], list) and want[name] and isinstance(want[name][0], np.ndarray):
            assert all(np.array_equal(a, b) for a, b in zip(got[name], want[name], strict=True)), name
        else:
            assert got[name] == want[name], name


def test_a_search_killed_anywhere_resumes_to_the_uninterrupted_outputs(setting):
    out, kills = _chain(setting, "search", SEARCH, [SEARCH_POINTS[p] for p in QUICK_SEARCH])
    assert kills >= len(QUICK_SEARCH) - 1
    _assert_same(out, setting["reference"]["search"])


def test_a_compression_killed_anywhere_resumes_to_the_uninterrupted_outputs(setting):
    out, kills = _chain(setting, "compress", COMPRESS, [COMPRESS_POINTS[p] for p in QUICK_COMPRESS])
    assert kills >= len(QUICK_COMPRESS) - 1
    _assert_same(out, setting["reference"]["compress"])


@pytest.mark.faults
@pytest.mark.parametrize("command, options, points", [("search", SEARCH, SEARCH_POINTS),
                                                      ("compress", COMPRESS, COMPRESS_POINTS)])
def test_every_kill_point_and_random_kills(setting, command, options, points):
    """All kill points in one chain, then runs killed once at a random time (up to 60% of the uninterrupted
    runs' length, measured two at a time) and resumed."""
    out, kills = _chain(setting, command, options, list(points.values()))
    print(f"{command}: {kills} of {len(points)} kill points hit")
    assert kills >= len(points) - 2
    _assert_same(out, setting["reference"][command])
    rng, killed = random.Random(0), 0
    for _ in range(RANDOM_KILLS):
        out, kills = _chain(setting, command, options, delay=rng.uniform(1.0, 0.6 * setting["seconds"][command]))
        killed += kills
        _assert_same(out, setting["reference"][command])
    print(f"{command}: {killed} of {RANDOM_KILLS} runs killed at a random time before they ended")
    assert killed >= RANDOM_KILLS // 3


LENET = create_model("lenet5", 10)
IMAGES = np.random.default_rng(0).normal(size=(16, 28, 28, 1)).astype(np.float32)
LABELS = np.arange(16, dtype=np.int32) % 10


@pytest.mark.parametrize("images, labels, words", [
    (IMAGES, LABELS[:10], "as many labels as images"),
    (IMAGES, LABELS[:, None], "shape (N,)"),  # scored as an accuracy of 4.52 before
    (IMAGES[:0], LABELS[:0], "at least one image"),
    (IMAGES, LABELS.astype(np.float32), "integer"),
    (IMAGES, LABELS + 1, "[0, 10)"),
    (IMAGES, LABELS - 1, "[0, 10)"),
    (np.where(np.arange(16)[:, None, None, None] == 3, np.nan, IMAGES).astype(np.float32), LABELS, "NaN"),
])
def test_the_library_refuses_labels_it_cannot_score(tmp_path, images, labels, words):
    with pytest.raises(DataError) as error:
        search(LENET, init_model(LENET, (28, 28, 1)), (images, labels), method="random", episodes=1, progress=False,
               out=tmp_path / "s")
    assert words in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "s").exists()


@pytest.mark.faults
@pytest.mark.parametrize("gap", [0.3, 0.02])
def test_two_ctrl_c_during_a_search_are_one_line_and_status_130(tmp_path, gap):
    """A second Ctrl-C while the first one unwinds ends the process at once, with the same one line (it used to end
    in pages of "Exception ignored in atexit callback")."""
    out = tmp_path / "s"
    process = subprocess.Popen([sys.executable, "-m", "agmc_jax.cli", "search", "--workdir", str(BASELINE), "--out",
                                str(out), "--method", "random", "--episodes", "200", "--reward-images", "200"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 300
    while not (out / "episodes.jsonl").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    for _ in range(2):
        process.send_signal(signal.SIGINT)
        time.sleep(gap)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err and err.count("interrupted") == 1, err


@pytest.mark.faults
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root only)")
@pytest.mark.parametrize("free_kib", [96, 60, 30])
def test_a_disk_that_fills_during_a_search_is_one_line(tmp_path, free_kib):
    """The write that meets the full disk varies with the space left: each is one error line and exit status 2 (the
    failed write's orbax tasks reported hundreds of lines as the interpreter tore down)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        (disk / "filler").write_bytes(bytes(2 * 1024 * 1024 - free_kib * 1024))
        run = subprocess.run([sys.executable, "-m", "agmc_jax.cli", "search", "--workdir", str(BASELINE), "--out",
                              str(disk / "s"), "--episodes", "4", "--reward-images", "200"], capture_output=True,
                             text=True, cwd=Path(__file__).parents[1])
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines()
             if line.strip() and "it/s" not in line and "s/it" not in line and not line.endswith("compiling (once)")]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("agmc search: error: "), run.stderr[-3000:]
