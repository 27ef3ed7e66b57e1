"""``diffsolve sweep``: a Markdown table and a FID-vs-NFE PNG, resumable; without matplotlib a clear error
before any sampling."""

import sys

import numpy as np
import pytest
from PIL import Image

from diffsolve.cli import main



@pytest.fixture(scope="module")
def setup(fid_model_and_reference, tmp_path_factory):
    return (*fid_model_and_reference, tmp_path_factory.mktemp("sweep"))


def sweep_args(model, ref, root, *extra):
    return ["sweep", "--model", str(model), "--samplers", "ddim,dpm_solver_pp", "--steps", "1,3", "--num", "16",
            "--shard-size", "8", "--batch-size", "8", "--ref", str(ref), "--workdir", str(root / "work"),
            "--out-md", str(root / "sweep.md"), "--out-png", str(root / "sweep.png"), "--quiet", *extra]


def test_sweep_writes_table_and_plot_and_resumes(setup, capsys):
    pytest.importorskip("matplotlib")
    model, ref, root = setup
    assert main(sweep_args(model, ref, root)) == 0
    table = (root / "sweep.md").read_text()
    assert table == capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ddim") or line.startswith("| dpm_solver_pp")]
    assert len(rows) == 4
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [(c[0], c[1], c[2]) for c in cells] == [("ddim", "1", "1"), ("ddim", "3", "3"),
                                                  ("dpm_solver_pp", "1", "1"), ("dpm_solver_pp", "3", "3")]
    assert all(float(c[3]) > 0 for c in cells)
    img = np.asarray(Image.open(root / "sweep.png"))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 10
    assert sorted(p.name for p in (root / "work").iterdir()) == ["ddim-1", "ddim-3", "dpm_solver_pp-1", "dpm_solver_pp-3"]
    # a rerun finds every shard done and prints the same table
    assert main(sweep_args(model, ref, root)) == 0
    assert capsys.readouterr().out == table


def test_sweep_without_matplotlib_fails_before_sampling(setup, tmp_path, capsys, monkeypatch):
    model, ref, _ = setup
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(sweep_args(model, ref, tmp_path)) == 2
    assert "pip install 'diffsolve[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    # without --out-png the table is still made
    args = sweep_args(model, ref, tmp_path)
    i = args.index("--out-png")
    del args[i:i + 2]
    args[args.index("--steps") + 1] = "1"
    assert main(args) == 0 and (tmp_path / "sweep.md").is_file() and not (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize("samplers,message", [("ddim,nope", "unknown sampler 'nope'"),
                                              ("adaptive_sde", "chooses its own steps")])
def test_sweep_checks_every_sampler_first(setup, tmp_path, capsys, samplers, message):
    from diffsolve.registry import list_samplers

    if samplers == "adaptive_sde" and "adaptive_sde" not in list_samplers():
        pytest.skip("no adaptive sampler registered")
    model, ref, _ = setup
    args = sweep_args(model, ref, tmp_path)
    args[args.index("--samplers") + 1] = samplers
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("option,message", [("pndm:order=2", "is not one of --samplers"),
                                            ("ddim", "expected SAMPLER:NAME=VALUE"),
                                            ("ddim:bogus=1", "unknown option")])
def test_sweep_per_sampler_options_are_checked_first(setup, tmp_path, capsys, option, message):
    model, ref, _ = setup
    assert main(sweep_args(model, ref, tmp_path, "--option", option)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
