"""mkdocs hook: the notebooks of `colab/` as pages under `notebooks/`, built from the stored .ipynb files.

The notebooks are kept without outputs (tests/test_notebooks.py checks it), so a page is their cells in order:
Markdown cells as they are, code cells as Python blocks (IPython's `!` and `%` lines included). Nothing is run.
This replaces mkdocs-jupyter (nbconvert and its dependencies) with some thirty lines and keeps the build fast.
"""
import json
from pathlib import Path

from mkdocs.structure.files import File

NOTEBOOKS = "colab"  # relative to the directory holding mkdocs.yml
PAGES = "notebooks"


def notebook_markdown(path: Path) -> str:
    """The Markdown page of the notebook at `path`: its cells in order, a note on where it lives."""
    cells = json.loads(path.read_text())["cells"]
    parts = []
    for cell in cells:
        source = "".join(cell["source"]).rstrip()
        if not source:
            continue
        if cell["cell_type"] == "markdown":
            parts.append(source)
        elif cell["cell_type"] == "code":
            tags = cell.get("metadata", {}).get("tags", [])
            note = "# parameters (the test suite overrides this cell)\n" if "parameters" in tags else ""
            parts.append(f"```python\n{note}{source}\n```")
    parts.insert(1, f'!!! note "Stored without outputs"\n    This page shows `{NOTEBOOKS}/{path.name}` as it is '
                    "in the repository; run it in Jupyter or Colab (the badge above) to see its outputs.")
    return "\n\n".join(parts) + "\n"


def on_files(files, config):
    """Add one generated page per notebook."""
    root = Path(config.config_file_path).parent
    for path in sorted((root / NOTEBOOKS).glob("*.ipynb")):
        files.append(File.generated(config, f"{PAGES}/{path.stem}.md", content=notebook_markdown(path)))
    return files
