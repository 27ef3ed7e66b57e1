"""``diffsolve sweep``: a Markdown table and a FID-vs-NFE PNG, resumable; without matplotlib a clear error
before any sampling."""

import re
import sys
import time

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
                                              ("adaptive_sde", "give --rtol, e.g. --rtol 0.1,0.05,0.02")])
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


def test_sweep_varies_an_adaptive_samplers_tolerance(setup, tmp_path, capsys):
    """adaptive_sde is swept over --rtol; each point is the `diffsolve fid` run at that tolerance (same FID and
    measured mean NFE), and a tighter tolerance takes more network evaluations. A UNet-only folder with
    --scheduler-config sweeps like the pipeline folder."""
    import shutil

    model, ref, _ = setup
    unet_dir, sched_dir = tmp_path / "unet", tmp_path / "sched"
    shutil.copytree(model / "unet", unet_dir)
    shutil.copytree(model / "scheduler", sched_dir)
    common = ["--num", "4", "--shard-size", "4", "--batch-size", "4", "--ref", str(ref), "--quiet",
              "--kid-subsets", "0"]
    assert main(["sweep", "--model", str(unet_dir), "--scheduler-config", str(sched_dir), "--samplers",
                 "ddim,adaptive_sde", "--steps", "2", "--rtol", "0.5,0.05", "--workdir", str(tmp_path / "work"),
                 *common]) == 0
    table = capsys.readouterr().out
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith(("| ddim", "| adaptive_sde"))]
    assert [c[:2] for c in cells] == [["ddim", "2"], ["adaptive_sde", "rtol 0.5"], ["adaptive_sde", "rtol 0.05"]]
    loose, tight = float(cells[1][2]), float(cells[2][2])
    assert 2 < loose < tight
    assert main(["fid", "--model", str(model), "--sampler", "adaptive_sde", "--rtol", "0.05", *common]) == 0
    single = re.search(r"FID (\S+); 4 samples, NFE (\S+) ", capsys.readouterr().out)
    assert (float(single[1]), float(single[2])) == (pytest.approx(float(cells[2][3]), abs=1e-3), tight)


@pytest.mark.parametrize("samplers,rtol,flag,value", [("ddim", "0.1", "--rtol", "0.1"),
                                                      ("adaptive_sde", "0", "--rtol", "'0'"),
                                                      ("adaptive_sde", "0.1,nan", "--rtol", "nan")])
def test_sweep_rtol_is_checked_first(setup, tmp_path, capsys, samplers, rtol, flag, value):
    model, ref, _ = setup
    args = sweep_args(model, ref, tmp_path, "--rtol", rtol)
    args[args.index("--samplers") + 1] = samplers
    start = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - start < 1.0
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert flag in line and value in line
    assert not (tmp_path / "work").exists()
