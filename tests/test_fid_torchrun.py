"""torchrun scale-out: 2 gloo processes on the CPU give exactly the FID (and the very shard files) of 1 process,
a run half done by 2 processes is finished by 1, and an error on the ranks ends every rank instead of hanging."""

import json

import numpy as np
import pytest

from diffsolve.cli import main

from fid_helpers import run_module

pytestmark = pytest.mark.skipif(not __import__("torch").distributed.is_available(),
                                reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def setup(fid_model_and_reference, tmp_path_factory):
    return (*fid_model_and_reference, tmp_path_factory.mktemp("torchrun"))


def args(model, ref, workdir, *extra):
    return ["--model", str(model), "--sampler", "dpm_solver_pp", "--steps", "3", "--num", "40", "--shard-size", "8",
            "--batch-size", "8", "--ref", str(ref), "--workdir", str(workdir), *extra]


def outcome(workdir):
    res = json.loads((workdir / "result.json").read_text())
    shards = {p.name: p.read_bytes() for p in sorted((workdir / "shards").glob("*.npz"))}
    feats = {k: np.load(workdir / "shards" / k)["features"] for k in shards}
    return res, feats


@pytest.fixture(scope="module")
def one_process(setup):
    """The single-process run both comparisons need: (stdout, (result, shard features))."""
    model, ref, root = setup
    rc, out, err = run_module(args(model, ref, root / "one"))
    assert rc == 0, err
    return out, outcome(root / "one")


def test_two_gloo_processes_match_one(setup, one_process):
    model, ref, root = setup
    out1, (res1, f1) = one_process
    rc2, out2, err2 = run_module(args(model, ref, root / "two"), torchrun=2, timeout=180)
    assert rc2 == 0, err2
    print(out1.strip(), "|", out2.strip())
    assert "[rank 1] shard" in err2 and "[rank 0] shard" in err2  # both ranks did work
    assert out2.count("FID ") == 1  # only rank 0 reports
    res2, f2 = outcome(root / "two")
    assert res2["fid"] == res1["fid"] and res2["kid"] == res1["kid"] and res2["count"] == 40
    assert f1.keys() == f2.keys() and all(np.array_equal(f1[k], f2[k]) for k in f1)


def test_two_processes_stopped_one_process_finishes(setup, one_process):
    model, ref, root = setup
    workdir = root / "mixed"
    rc, out, err = run_module(args(model, ref, workdir, "--max-shards", "1"), torchrun=2, timeout=180)
    assert rc != 0 and "2 of 5 shards done" in out, (rc, out, err)  # torchrun reports rank 0's exit status 3
    assert len(list((workdir / "shards").glob("*.npz"))) == 2
    assert main(["fid", *args(model, ref, workdir, "--quiet")]) == 0
    assert outcome(workdir)[0]["fid"] == one_process[1][0]["fid"]


def test_an_error_ends_every_rank(setup, tmp_path):
    model, ref, _ = setup
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("not a workdir")
    rc, out, err = run_module(args(model, ref, workdir), torchrun=2, timeout=120)
    assert rc != 0 and "not a diffsolve fid workdir" in err
