import matplotlib.image as mpimg

from memtool.estimator import load_influence
from memtool.figures import run_figures, trusted_pairs


def test_run_figures_writes_readable_pngs(digits_run, tmp_path):
    run, summary = digits_run
    paths = run_figures(run, tmp_path / "figs", top=8)
    names = [p.name for p in paths]
    assert names[:2] == ["mem_hist.png", "most_memorized.png"]
    trusted = trusted_pairs(load_influence(run))  # high pairs with posterior P >= 0.5: the only ones drawn
    assert ("high_influence_pairs.png" in names) == (len(trusted) > 0)
    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 150 and img.std() > 0.01  # a real picture, not blank


def test_cli_figures(digits_run, tmp_path, capsys):
    from memtool.cli import main

    run, _ = digits_run
    assert main(["figures", str(run), "--out", str(tmp_path / "f")]) == 0
    assert f"wrote {tmp_path / 'f' / 'mem_hist.png'}" in capsys.readouterr().out
