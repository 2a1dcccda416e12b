"""The colab/ notebooks run top to bottom in a fresh kernel of this interpreter, with the values of their
`parameters` cell (papermill's convention) made small; a cell that raises fails the test (nbclient)."""
import ast
import gzip
import json
import sys
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest

import agmc_jax
from agmc_jax.data.fashion_mnist import DEFAULT_IDX_DIR, IDX_FILES, idx_path, read_idx

COLAB = Path(__file__).parents[1] / "colab"
NOTEBOOKS = sorted(path.stem for path in COLAB.glob("*.ipynb"))
BADGE = "https://colab.research.google.com/github/agmc-jax/agmc-jax/blob/main/colab/{}.ipynb"
# Fashion-MNIST cut to its first images: 1,024 training images and the 5,000 of the validation split, 512 test.
SIZES = {"train": 1024 + 5000, "test": 512}


def with_parameters(notebook, values):
    """`notebook` with the assignments of its `parameters` cell set to `values` (each name must be there)."""
    cell, = (c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for node in ast.parse(cell.source).body:
        name = node.targets[0].id if isinstance(node, ast.Assign) else None
        if name in values:
            comment = lines[node.end_lineno - 1][node.end_col_offset:]
            lines[node.lineno - 1:node.end_lineno] = [f"{name} = {values[name]!r}{comment}"] + \
                [""] * (node.end_lineno - node.lineno)  # keeps the line numbers of the nodes below
    cell.source = "\n".join(lines)
    missing = set(values) - {n.targets[0].id for n in ast.parse(cell.source).body if isinstance(n, ast.Assign)}
    assert not missing, f"no knob {missing} in the parameters cell"
    return notebook


def execute(name, directory, **values):
    """The notebook `name` run top to bottom in `directory` with its knobs set to `values`; first a cell checks
    that the kernel is this interpreter's (the venv's), not another Python on the path."""
    notebook = with_parameters(nbformat.read(COLAB / f"{name}.ipynb", as_version=4), values)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix"))
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(directory)}}).execute()
    return notebook


def _write_idx(path, array):
    """An IDX file of unsigned bytes, gzipped: two zero bytes, type 0x08, rank, big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as file:
        file.write(header + array.tobytes())


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A directory of Fashion-MNIST IDX files cut from Debian's (what a notebook's DATA_DIR points to), prepared
    into a tfds cache of its own that the test removes with its temporary directory."""
    directory = tmp_path_factory.mktemp("fashion_mnist")
    for split, stems in IDX_FILES.items():
        for stem in stems:
            _write_idx(directory / f"{stem}.gz", read_idx(idx_path(DEFAULT_IDX_DIR, stem))[:SIZES[split]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AGMC_TFDS_DIR", str(tmp_path_factory.mktemp("tfds")))
        yield str(directory)


def outputs(notebook, kind):
    """Every output of `kind` (a MIME type, or 'stream') of the executed notebook's cells."""
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if output.output_type == kind or kind in output.get("data", {})]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean_and_opens_in_colab(name):
    """No outputs in the repository; a Colab badge to itself, an install cell for Colab, one parameters cell."""
    notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert BADGE.format(name) in notebook.cells[0].source and notebook.cells[0].cell_type == "markdown"
    assert '"google.colab" in sys.modules' in code[0].source and "pip install -q -e" in code[0].source
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1


def test_notebooks_are_all_tested():
    """A notebook added to colab/ needs a test below that runs it."""
    assert NOTEBOOKS == ["own_model", "quickstart", "reproduce_cifar10"]


def test_quickstart(small_data, tmp_path):
    """ResNet-20 compressed by `agmc compress` within 50% of its MACs; the two plots and the report are shown."""
    notebook = execute("quickstart", tmp_path, EPISODES=4, REWARD_IMAGES=100, RERANK=0, FINETUNE_EPOCHS=1,
                       DATA_DIR=small_data, OUT="runs/quickstart")
    report = json.loads((tmp_path / "runs" / "quickstart" / "report.json").read_text())
    assert report["model"] == "resnet20" and report["macs"]["ratio"] <= 0.5
    assert len(outputs(notebook, "image/png")) == 1  # one figure: reward per episode, keep ratio per layer
    shown, = outputs(notebook, "text/markdown")
    assert shown["data"]["text/markdown"] == (tmp_path / "runs" / "quickstart" / "report.md").read_text()


@pytest.mark.slow  # 62 s; test_compress and test_export run its paths by default
def test_own_model(small_data, tmp_path):
    """A Linen CNN of the notebook's own trained, traced (two residual groups), searched, slimmed (same logits as
    masked: the notebook asserts it), fine-tuned and exported; a process without its code runs the export."""
    notebook = execute("own_model", tmp_path, TRAIN_EPOCHS=1, EPISODES=4, REWARD_IMAGES=100, RERANK=0, FINETUNE_EPOCHS=1,
                       DATA_DIR=small_data, WORKDIR="runs/own_model")
    work = tmp_path / "runs" / "own_model"
    assert (work / "export" / "model.stablehlo").is_file() and (work / "compress" / "report.json").is_file()
    assert len(outputs(notebook, "image/png")) == 1  # one figure: reward per episode, keep ratio per group
    printed = "".join(output.text for output in outputs(notebook, "stream"))
    assert "a fresh process without the network's code ran the export: logits (512, 10)" in printed


def test_reproduction_knobs_are_the_configs_full_run():
    """The reproduction notebook's defaults are its config's schedule, not a shortened one."""
    notebook = nbformat.read(COLAB / "reproduce_cifar10.ipynb", as_version=4)
    cell, = (c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    knobs = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}
    config = agmc_jax.load_config(COLAB.parent / "experiments" / "configs" / "resnet56_cifar10.py")
    assert (knobs["TRAIN_EPOCHS"], knobs["EPISODES"], knobs["REWARD_IMAGES"], knobs["FINETUNE_EPOCHS"]) == \
        (config.train.epochs, config.compress.episodes, config.compress.reward_images, config.compress.finetune_epochs)
    assert knobs["DRY_RUN"] is False and knobs["DATA_DIR"] is None


def test_reproduce_cifar10_dry_run(tmp_path):
    """ResNet-56 through `agmc_jax.reproduce` on tfds mock data: every stage, the comparison table, the plots and
    the report shown."""
    notebook = execute("reproduce_cifar10", tmp_path, DRY_RUN=True, WORKDIR="runs/reproduce")
    summary = json.loads((tmp_path / "runs" / "reproduce" / "reproduce.json").read_text())
    assert summary["published"]["dense"] == 92.8 and 0 < summary["measured"]["macs_ratio"] <= 0.5
    assert len(outputs(notebook, "image/png")) == 1
    table, report = (output["data"]["text/markdown"] for output in outputs(notebook, "text/markdown"))
    assert "| published | 92.8 | 91.9 |" in table and "(dry run: random data)" in table
    assert report == (tmp_path / "runs" / "reproduce" / "compress" / "report.md").read_text()
