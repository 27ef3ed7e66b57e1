"""``diffsolve fid``: shards, resume after --max-shards or a kill, corrupt and partial shards, refused workdirs,
bad input, and a folder of PNGs giving exactly the FID of the generation it came from."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffsolve.cli import main

from fid_helpers import REPO, env_one_thread, write_pngs


@pytest.fixture(scope="module")
def setup(fid_model_and_reference, tmp_path_factory):
    return (*fid_model_and_reference, tmp_path_factory.mktemp("fidrun"))


def fid_args(model, ref, workdir, *extra, num=40, steps=3):
    return ["fid", "--model", str(model), "--sampler", "ddim", "--steps", str(steps), "--num", str(num),
            "--shard-size", "8", "--batch-size", "4", "--ref", str(ref), "--workdir", str(workdir), *extra]


def result(workdir):
    return json.loads((workdir / "result.json").read_text())


def shard_features(workdir):
    return {p.name: np.load(p)["features"] for p in sorted((workdir / "shards").glob("*.npz"))}


@pytest.fixture(scope="module")
def uninterrupted(setup):
    model, ref, root = setup
    workdir = root / "full"
    assert main(fid_args(model, ref, workdir, "--quiet")) == 0
    return result(workdir), shard_features(workdir)


def test_uninterrupted_run_writes_shards_and_result(uninterrupted, setup):
    res, feats = uninterrupted
    print(f"tiny model, 40 samples: FID-digits {res['fid']:.4f}, KID {res['kid']:.5f}")
    assert sorted(feats) == [f"{i:06d}.npz" for i in range(5)]
    assert all(f.shape == (8, 64) for f in feats.values())
    assert res["count"] == 40 and res["nfe"] == 3 and res["fid"] > 0 and res["kid_subset_size"] == 40


def test_resume_after_max_shards_gives_exactly_the_same_fid(uninterrupted, setup, tmp_path, capsys):
    model, ref, _ = setup
    workdir = tmp_path / "w"
    assert main(fid_args(model, ref, workdir, "--max-shards", "2")) == 3
    out = capsys.readouterr()
    assert "2 of 5 shards done" in out.out and "rerun" in out.out
    assert len(list((workdir / "shards").glob("*.npz"))) == 2 and not (workdir / "result.json").exists()
    assert main(fid_args(model, ref, workdir, "--max-shards", "1")) == 3
    assert "3 of 5 shards done" in capsys.readouterr().out
    assert main(fid_args(model, ref, workdir)) == 0
    err = capsys.readouterr().err
    assert err.count("done in") == 2  # only the two missing shards were computed
    assert result(workdir)["fid"] == uninterrupted[0]["fid"]
    assert result(workdir)["kid"] == uninterrupted[0]["kid"]
    for name, f in shard_features(workdir).items():
        assert np.array_equal(f, uninterrupted[1][name])


def test_corrupt_partial_and_leftover_files_are_detected_and_redone(uninterrupted, setup, tmp_path, capsys):
    model, ref, _ = setup
    workdir = tmp_path / "w"
    assert main(fid_args(model, ref, workdir, "--quiet")) == 0
    shards = sorted((workdir / "shards").glob("*.npz"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # partial: a truncated file
    with np.load(shards[2]) as z:  # corrupt: features changed, the stored checksum kept
        arrays = dict(z)
    arrays["features"] = arrays["features"].copy()
    arrays["features"][3, 5] += 1e-3
    np.savez(shards[2], **arrays)
    data = bytearray(shards[3].read_bytes())  # corrupt: a flipped byte inside the file
    data[len(data) // 2] ^= 0xFF
    shards[3].write_bytes(bytes(data))
    shards[4].unlink()
    (workdir / "shards" / ".000004.npz.abc.tmp").write_bytes(b"half a shard")  # a killed writer's leftover
    capsys.readouterr()
    assert main(fid_args(model, ref, workdir)) == 0
    err = capsys.readouterr().err
    assert "shard 2/5: unreadable" in err and "shard 3/5: checksum mismatch" in err and "shard 4/5: " in err
    assert err.count("done in") == 4
    assert result(workdir)["fid"] == uninterrupted[0]["fid"]
    assert not list((workdir / "shards").glob("*.tmp"))


def test_resume_after_a_kill(uninterrupted, setup, tmp_path):
    model, ref, _ = setup
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "diffsolve.fid", *fid_args(model, ref, workdir)[1:]]
    proc = subprocess.Popen(cmd, env=env_one_thread(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not list((workdir / "shards").glob("*.npz")):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list((workdir / "shards").glob("*.npz")))
    print(f"killed with {done} of 5 shards written")
    assert 1 <= done < 5 and not (workdir / "result.json").exists()
    assert main(fid_args(model, ref, workdir, "--quiet")) == 0
    assert result(workdir)["fid"] == uninterrupted[0]["fid"]
    for name, f in shard_features(workdir).items():
        assert np.array_equal(f, uninterrupted[1][name])


@pytest.mark.parametrize("change,message", [
    (("--steps", "4"), "source.steps: 3 in the workdir, 4 now"),
    (("--seed-start", "5"), "source.seed_start: 0 in the workdir, 5 now"),
    (("--num", "48"), "num: 40 in the workdir, 48 now"),
    (("--shard-size", "10"), "shard_size: 8 in the workdir, 10 now"),
])
def test_workdir_from_other_settings_is_refused(setup, tmp_path, capsys, change, message):
    model, ref, _ = setup
    workdir = tmp_path / "w"
    assert main(fid_args(model, ref, workdir, "--max-shards", "1", "--quiet")) == 3
    args = fid_args(model, ref, workdir)
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was made with other settings" in err and message in err
    assert len(list((workdir / "shards").glob("*.npz"))) == 1


def test_a_foreign_folder_is_not_taken_as_workdir(setup, tmp_path, capsys):
    model, ref, _ = setup
    (tmp_path / "notes.txt").write_text("mine")
    assert main(fid_args(model, ref, tmp_path)) == 2
    assert "not a diffsolve fid workdir" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(setup, tmp_path, capsys):
    model, ref, _ = setup
    assert main(fid_args(model, ref, tmp_path / "a", num=1)) == 2
    assert "at least 2 samples" in capsys.readouterr().err
    mixed = write_pngs(tmp_path / "mixed", np.zeros((3, 16, 16), dtype=np.uint8))
    write_pngs(mixed, np.zeros((2, 20, 16), dtype=np.uint8), start=3)
    assert main(["fid", "--images", str(mixed), "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "mixed sizes" in err and "16×16" in err and "16×20" in err
    assert main(["fid", "--images", str(tmp_path / "none"), "--ref", str(ref)]) == 2
    assert "image folder not found" in capsys.readouterr().err
    few = write_pngs(tmp_path / "few", np.zeros((3, 16, 16), dtype=np.uint8))
    assert main(["fid", "--images", str(few), "--ref", str(ref), "--num", "5"]) == 2
    assert "holds only 3" in capsys.readouterr().err
    big = write_pngs(tmp_path / "big", np.zeros((3, 28, 28), dtype=np.uint8))
    assert main(["fid", "--images", str(big), "--ref", str(ref)]) == 2
    assert "16×16" in capsys.readouterr().err
    assert main(fid_args(model, tmp_path / "nope.npz", tmp_path / "b")) == 2
    assert "fid-ref" in capsys.readouterr().err
    assert main(fid_args(model, ref, tmp_path / "c", "--bogus", "1")) == 2
    assert "unknown option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fid", "--model", str(model), "--images", str(few), "--ref", str(ref)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_folder_of_pngs_gives_the_fid_of_the_generation(setup, tmp_path, capsys):
    model, ref, _ = setup
    out_dir = tmp_path / "pngs"
    assert main(["sample", "--model", str(model), "--sampler", "ddim", "--steps", "3", "--num", "8", "--seed", "0",
                 "--out-dir", str(out_dir), "--quiet"]) == 0
    gen = fid_args(model, ref, tmp_path / "gen", "--quiet", num=8)
    gen[gen.index("--batch-size") + 1] = "8"  # the batch `sample` drew them in
    assert main(gen) == 0
    assert main(["fid", "--images", str(out_dir), "--ref", str(ref), "--workdir", str(tmp_path / "png"), "--quiet"]) == 0
    assert result(tmp_path / "png")["fid"] == result(tmp_path / "gen")["fid"]
    assert result(tmp_path / "png")["nfe"] is None and result(tmp_path / "gen")["nfe"] == 3
