"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel (nbclient), with fewer training
steps than a user's run (HAMJAX_NOTEBOOK_STEPS), and shows what it says it shows."""

from __future__ import annotations

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAMJAX_NOTEBOOK_STEPS", "100")
        patch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        NotebookClient(
            notebook, timeout=600, kernel_name="python3",
            resources={"metadata": {"path": str(tmp_path_factory.mktemp("notebook"))}},
        ).execute()
    return notebook


def test_the_committed_notebook_holds_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_every_cell_runs_without_error(executed):
    errors = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]


def test_the_parallel_and_token_by_token_forms_agree(executed):
    text = "".join(_text(cell) for cell in executed.cells if cell.cell_type == "code")
    assert "same admissions: True" in text
    difference = float(re.search(r"max \|parallel - token by token\|: (\S+)", text).group(1))
    assert difference < 1e-4


def test_training_runs_the_requested_steps_and_every_plot_is_drawn(executed):
    text = "".join(_text(cell) for cell in executed.cells if cell.cell_type == "code")
    assert re.search(r"^100 steps in \d+ s; held-out accuracy", text, re.M)
    images = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # training curves, admitted tokens, threshold sweep
    sweep = re.findall(r"tau x (\S+)\s+KV fraction (\S+)\s+accuracy (\S+)", text)
    assert len(sweep) >= 5
    fractions = [float(f) for _, f, _ in sweep]  # from a quarter of the trained thresholds to 1000x them
    assert fractions[0] > fractions[-1] == 0.0
