"""The atypical-samples notebook runs headless on a tiny run."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "analyses" / "notebooks" / "atypical_samples.ipynb"


def test_notebook_executes_without_errors(digits_run, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run, _ = digits_run
    monkeypatch.setenv("MEMTOOL_RUN", str(run))
    monkeypatch.setenv("MEMTOOL_FIGURES", str(NOTEBOOK.parents[2] / "figures"))  # the committed studies
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "atypical (mem >= 0.25)" in text and "trials" in text
    html_tables = [o for o in outputs if o.output_type == "execute_result" and "text/html" in o.get("data", {})]
    assert html_tables and "atypical" in html_tables[0]["data"]["text/html"]
    html_tables += [o for o in outputs if o.output_type == "display_data" and "text/html" in o.get("data", {})]
    findings = [t["data"]["text/html"] for t in html_tables if "harmful 195 - random 195: robust" in t["data"]["text/html"]]
    assert findings and "mnist-regime" in findings[0] and "AT robust loss - ST clean loss" in findings[0]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6  # histograms, verdicts and galleries, inline


def test_own_model_notebook_executes(tmp_path, monkeypatch):
    """docs/own-model.md's notebook: a BN CNN on an image folder and an MLP on features, through
    estimate, scores, figures, validate, train and a clean evaluation."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = Path(__file__).parents[1]
    monkeypatch.setenv("MEMTOOL_REPO", str(root))
    monkeypatch.setenv("MEMTOOL_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("MEMTOOL_TRIALS", "4")
    nb = nbformat.read(root / "analyses" / "notebooks" / "own_model.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "(30,) float32 input range: None" in text and "clean accuracy of the trained model: 0.9" in text
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert 4 <= images <= 5  # digits: 3, and the pairs gallery where 4 trials make a pair trusted; features: 1
