"""Checkpoint reads: what an earlier failed read left does not fail a later read of a valid checkpoint."""
import asyncio
import gc
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from agmc_jax import checkpoint, runs
from agmc_jax.errors import CheckpointError, CheckpointWarning


@pytest.fixture
def good_and_corrupt(tmp_path):
    for name in ("good", "corrupt"):
        checkpoint.save(tmp_path / name, 1, {"a": np.arange(3.0)})
    (tmp_path / "corrupt" / "1" / "default" / "manifest.ocdbt").write_bytes(b"garbage")
    return tmp_path / "good", tmp_path / "corrupt"


def _orphan_failed_task():
    """A finished task whose exception nobody retrieved, in a reference cycle: what a failed orbax read
    leaves behind, reported by asyncio on the ERROR log only when the garbage collector frees it."""
    async def fail():
        raise ValueError("an earlier read failed")

    loop = asyncio.new_event_loop()
    holder = [loop.create_task(fail())]
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    holder.append(holder)


def test_a_late_report_of_an_earlier_failure_does_not_fail_a_valid_read(good_and_corrupt, monkeypatch):
    """The collector runs in the middle of the valid read (as it may at any allocation): before the fix the
    orphan's report was taken for this read's failure and a valid checkpoint was called corrupt."""
    good, corrupt = good_and_corrupt
    restore = ocp.CheckpointManager.restore

    def collecting(*args, **kwargs):
        gc.collect()
        return restore(*args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", collecting)
    gc.disable()
    try:
        with pytest.raises(CheckpointError, match="corrupt"):
            checkpoint.restore(corrupt)
        _orphan_failed_task()
        np.testing.assert_array_equal(checkpoint.restore(good)["a"], np.arange(3.0))
    finally:
        gc.enable()



@pytest.mark.parametrize("baseline", ["lenet5_fashion_mnist", "resnet20_fashion_mnist"])
def test_the_shipped_baselines_carry_checksums_that_match(baseline):
    """A flipped byte in a shipped baseline is refused like one in any checkpoint: each step has its manifest."""
    directory = Path(__file__).parents[1] / "agmc_jax" / "baselines" / baseline / "checkpoints"
    steps = [p.name for p in directory.iterdir() if p.name.isdigit()]
    assert steps and all((directory / checkpoint.MANIFESTS / f"{step}.json").is_file() for step in steps)
    for step in steps:
        checkpoint._verify(directory, int(step))


def test_an_output_another_process_holds_is_in_use_before_anything_else_is_said(tmp_path):
    """A second command on a busy output names the holder's pid, not "pass --resume" (its files are being written)."""
    import subprocess
    import sys

    from agmc_jax.networks import check_new_output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path / "out" / checkpoint.LOCK)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match="in use by another agmc process \\(pid 4242\\)"):
            check_new_output(tmp_path / "w", tmp_path / "out", resume=False)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(CheckpointError, match="already holds files"):
        check_new_output(tmp_path / "w", tmp_path / "out", resume=False)


def test_a_step_without_its_manifest_is_unverified_and_passed_over_for_an_older_one(tmp_path):
    """A step without manifest where the directory has manifests (killed before it, or copied in) is not read: a
    resume goes back to the newest verified step with one warning."""
    for step in (1, 2):
        checkpoint.save(tmp_path, step, {"a": np.full(3, float(step))})
    (tmp_path / checkpoint.MANIFESTS / "2.json").unlink()
    with pytest.raises(CheckpointError, match="no checksum manifest"):
        checkpoint.restore(tmp_path, 2)
    with pytest.warns(CheckpointWarning) as caught:
        step, value = checkpoint.restore_newest(tmp_path, lambda s: checkpoint.restore(tmp_path, s))
    assert step == 1 and len(caught) == 1 and "no checksum manifest" in str(caught[0].message)
    np.testing.assert_array_equal(value["a"], np.full(3, 1.0))
    assert checkpoint.steps(tmp_path) == [1]
    (tmp_path / checkpoint.MANIFESTS / "1.json").unlink()  # killed before its first manifest: never trusted
    with pytest.warns(CheckpointWarning, match="starting over"):
        assert checkpoint.restore_newest(tmp_path, lambda s: checkpoint.restore(tmp_path, s)) is None
    assert checkpoint.steps(tmp_path) == []


def test_a_directory_written_before_manifests_is_read_with_one_warning(tmp_path, recwarn):
    """An older agmc's checkpoints (no manifests folder at all) are read, with one warning per directory."""
    import shutil

    checkpoint.save(tmp_path / "old", 1, {"a": np.arange(3.0)})
    shutil.rmtree(tmp_path / "old" / checkpoint.MANIFESTS)
    checkpoint.metadata(tmp_path / "old")
    np.testing.assert_array_equal(checkpoint.restore(tmp_path / "old")["a"], np.arange(3.0))
    warned = [w for w in recwarn if issubclass(w.category, CheckpointWarning)]
    assert len(warned) == 1 and "read unverified" in str(warned[0].message)


def test_a_run_continued_in_a_directory_written_before_manifests_adopts_its_steps(tmp_path):
    """The first step written into an older agmc's directory gives its steps manifests: were that save killed
    before its own manifest, the older steps would still be read, not removed as unverified."""
    import shutil

    checkpoint.save(tmp_path, 1, {"a": np.arange(3.0)})
    shutil.rmtree(tmp_path / checkpoint.MANIFESTS)
    checkpoint.save(tmp_path, 2, {"a": np.arange(3.0) + 1})
    assert sorted(p.name for p in (tmp_path / checkpoint.MANIFESTS).iterdir()) == ["1.json", "2.json"]
    (tmp_path / checkpoint.MANIFESTS / "2.json").unlink()  # killed before the new step's manifest
    with pytest.warns(CheckpointWarning, match="resuming from checkpoint 1"):
        assert checkpoint.restore_newest(tmp_path, lambda s: checkpoint.restore(tmp_path, s))[0] == 1


def test_run_fingerprints_differ_field_by_field_with_defaults_hashes_and_hints():
    """`runs.differences`: nested fields one by one (a field missing on one side at its default), hashes by name,
    ignored fields skipped, a hint after each changed field of its key, tuples equal to the lists JSON reads."""
    saved = {"model": "lenet5", "shape": [1, 2], "env": {"fill": True}, "agent": {"tau": 0.01}, "data": "ab12",
             "episodes": 10}
    now = {"model": "lenet5", "shape": (1, 2), "env": {"fill": True, "lbound": 0.2}, "agent": {"tau": 0.05},
           "data": "cd34", "episodes": 20}
    compare = {"defaults": {"env": {"fill": True, "lbound": 0.2}}, "hashed": ("data",), "ignored": ("episodes",),
               "hints": {"agent": "--agent-option {field}={old} keeps it"}}
    assert runs.differences(saved, now, **compare) == [
        "agent.tau 0.01 -> 0.05 (--agent-option tau=0.01 keeps it)", "data (another hash)"]
    assert runs.differences(saved, {**now, "env": {"fill": True, "lbound": 0.3}}, **compare)[0] == \
        "env.lbound 0.2 -> 0.3"
    assert runs.differences(now, now, **compare) == []


def test_resume_restores_the_newest_readable_step_of_its_own_run_and_refuses_a_foreign_one(tmp_path):
    """`runs.resume`: a corrupt newest step is passed over for the older one (with a warning); a step saved by
    another run is refused in one line naming the field and the fix; an empty directory is None."""
    directory = tmp_path / "run"
    assert runs.resume(directory, {"seed": 0}, lambda step, meta: None, "fix it") is None
    for step in (1, 2):
        checkpoint.save(directory, step, {"a": np.full(3, float(step))}, {"seed": 0, "step": step})
    (directory / "2" / "default" / "manifest.ocdbt").write_bytes(b"garbage")
    restore = lambda step, meta: checkpoint.restore(directory, step)["a"]  # noqa: E731
    with pytest.warns(CheckpointWarning, match="resuming from checkpoint 1"):
        step, meta, value = runs.resume(directory, {"seed": 0}, restore, "fix it", ignored=("step",))
    assert (step, meta["step"]) == (1, 1) and np.all(value == 1.0)
    with pytest.raises(CheckpointError) as error:
        runs.resume(directory, {"seed": 3}, restore, "use a new directory", ignored=("step",))
    assert str(error.value) == (f"checkpoint 1 in {directory} holds a run of another network, data or setting "
                                "(seed 0 -> 3); use a new directory")
