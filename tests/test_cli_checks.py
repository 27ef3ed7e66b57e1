"""The command line as a newcomer meets it (issue 19): every bad input is answered before any model is loaded,
in one line naming the flag and the value, with the subcommand's usage; help that states defaults; one line on
Ctrl-C; measurement settings carried from ``degrade`` to ``restore``."""

import argparse
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from diffsolve.cli import build_parser, main

from conftest import diffusers_log, make_tiny_unet
from test_cli import model_dir  # noqa: F401  (the tiny class-conditional model folder fixture)

ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = "/no/such/model/dir"  # a check that ran after loading would report this instead


def run_fast(argv, capsys):
    """``main(argv)`` for a bad input: exit status 2 within a second, one error line; returns stderr."""
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert elapsed < 1.0, f"{elapsed:.2f} s: the check ran after expensive work"
    assert "Traceback" not in err and NO_MODEL not in err
    return err


def assert_names(err, flag, value):
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(line) == 1, err
    assert flag in line[0] and value in line[0], line[0]


# ---- 1, 10: output paths, checked before the work -------------------------------------------------------

def output_cases(tmp_path):
    (tmp_path / "file.png").write_bytes(b"not a folder")
    (tmp_path / "adir").mkdir()
    cases = [
        (["sample", "--model", NO_MODEL, "--out", str(tmp_path / "adir")], "--out", "adir"),
        (["sample", "--model", NO_MODEL, "--out", str(tmp_path / "file.png" / "x.png")], "--out", "file.png/x.png"),
        (["sample", "--model", NO_MODEL, "--out", str(tmp_path / "a.jpg")], "--out", "a.jpg"),
        (["sample", "--model", NO_MODEL, "--out-dir", str(tmp_path / "file.png")], "--out-dir", "file.png"),
        (["degrade", "--task", "sr4", "--input", str(tmp_path / "file.png"), "--out", str(tmp_path / "adir")],
         "--out", "adir"),
        (["restore", "--task", "sr4", "--input", str(tmp_path / "file.png"), "--out", str(tmp_path / "r.jpeg")],
         "--out", "r.jpeg"),
        (["ems", "--model", NO_MODEL, "--out", str(tmp_path / "ems.png")], "--out", "ems.png"),
        (["fid-ref", "--data", "digits", "--out", str(tmp_path / "ref.txt")], "--out", "ref.txt"),
        (["fid", "--model", NO_MODEL, "--ref", "r.npz", "--workdir", str(tmp_path / "file.png")], "--workdir",
         "file.png"),
        (["sweep", "--samplers", "ddim", "--ref", "r.npz", "--workdir", str(tmp_path / "w"), "--out-md",
          str(tmp_path / "adir")], "--out-md", "adir"),
        (["digits", "--out", str(tmp_path / "file.png" / "d.png")], "--out", "file.png/d.png"),
    ]
    if Path("/proc/self").is_dir():  # a folder nobody can create files in, even root
        cases.append((["sample", "--model", NO_MODEL, "--out", "/proc/a.png"], "--out", "/proc/a.png"))
    return cases


@pytest.mark.parametrize("index", range(12))
def test_output_paths_are_checked_before_anything_runs(tmp_path, capsys, index):
    cases = output_cases(tmp_path)
    if index >= len(cases):
        pytest.skip("no /proc here")
    argv, flag, value = cases[index]
    err = run_fast(argv, capsys)
    assert_names(err, flag, value)
    assert f"usage: diffsolve {argv[0]}" in err  # the subcommand's usage, not the top-level one
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "w").exists()


# ---- 2, 3, 4, 10, 11: values parsed as what they are ------------------------------------------------------

@pytest.mark.parametrize("args,flag,value", [
    (["--sampler", "ddim", "--eta", "abc"], "--eta", "'abc'"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta", "'nan'"),
    (["--sampler", "ddim", "--eta", "1e400"], "--eta", "'1e400'"),
    (["--sampler", "dpm_solver_pp", "--order", "2.5"], "--order", "'2.5'"),
    (["--sampler", "dpm_solver_pp", "--lower-order-final", "maybe"], "--lower-order-final", "'maybe'"),
    (["--sampler", "sa_solver", "--tau", "inf"], "--tau", "'inf'"),
    (["--sampler", "bdia", "--x-next", "x.png"], "--x-next", "'x.png'"),
    (["--guidance", "nan", "--class", "1"], "--guidance", "'nan'"),
    (["--t-end", "inf"], "--t-end", "'inf'"),
    (["--device", "foo"], "--device", "'foo'"),
    (["--scale", "0"], "--scale", "'0'"),
    (["--num", "0"], "--num", "'0'"),
    (["--steps", "-3"], "--steps", "'-3'"),
    (["--sampler", "adaptive_sde", "--steps", "10"], "--steps", "10"),
    (["--guidance", "2"], "--guidance", "2"),  # guidance without --class or --prompt guides nothing
])
def test_sample_values_are_refused_with_flag_and_value(tmp_path, capsys, args, flag, value):
    err = run_fast(["sample", "--model", NO_MODEL, "--out", str(tmp_path / "x.png"), *args], capsys)
    assert_names(err, flag, value)


def test_usage_errors_print_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--num", "2"])  # neither --out nor --out-dir
    err = capsys.readouterr().err
    assert "usage: diffsolve sample" in err and "--out" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    for command in (["sample", "--out", out], ["restore", "--input", "y.png", "--out", out], ["fid", "--ref", "r.npz"]):
        err = run_fast([*command, "--model", NO_MODEL, "--device", "cuda"], capsys)
        assert_names(err, "--device", "cuda")
        assert "--device cpu" in err


def test_guidance_outside_the_usual_range_is_warned_about(tmp_path, capsys):
    code = main(["sample", "--model", NO_MODEL, "--class", "1", "--guidance", "-50", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "model folder not found" in err  # it went on: a warning, not an error
    assert re.search(r"warning: --guidance -50 is outside the usual range \[0, 30\]", err)


def test_class_errors_speak_in_flags(model_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(model_dir), "--class", "9", "--num", "1", "--out", str(tmp_path / "x.png"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--class 9: expected a label in 0–2 (or 3, the null class)" in err and "class_labels" not in err


# ---- the typed option parser: the declared types of the registered signatures ------------------------------

def test_options_are_read_as_their_declared_types():
    from diffsolve.cliargs import parse_options
    from diffsolve.inverse.registry import get_solver
    from diffsolve.registry import get_sampler

    assert parse_options(get_sampler("ddim"), {"eta": "0.5"}) == {"eta": 0.5}
    got = parse_options(get_sampler("sa_solver"), {"tau": "0,1,0.5", "corrector_order": "none",
                                                   "predictor_order": "3", "lower_order_final": "false"})
    assert got == {"tau": (0.0, 1.0, 0.5), "corrector_order": None, "predictor_order": 3, "lower_order_final": False}
    assert parse_options(get_sampler("sa_solver"), {"tau": "paper"}) == {"tau": "paper"}
    got = parse_options(get_sampler("dpm_solver_v3"), {"half_corrector": "official", "corrector": "true",
                                                       "ems": "ems.safetensors"})
    assert got == {"half_corrector": "official", "corrector": True, "ems": "ems.safetensors"}
    assert parse_options(get_solver("dds"), {"gamma": "none", "cg_steps": "7"}) == {"gamma": None, "cg_steps": 7}
    assert type(parse_options(get_solver("dps"), {"zeta": "2"})["zeta"]) is float


def test_every_registered_option_reads_its_own_default_back():
    """The parser covers every option the registry lists: the text of its default (where a command line can
    give it) reads back as the default."""
    from diffsolve.cliargs import parse_option
    from diffsolve.inverse.registry import get_solver, list_solvers
    from diffsolve.registry import get_sampler, list_samplers

    specs = [get_sampler(n) for n in list_samplers()] + [get_solver(n) for n in list_solvers()]
    checked = 0
    for spec in specs:
        params = inspect.signature(spec.fn).parameters
        for name, default in spec.options.items():
            text = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            try:
                value = parse_option(params[name], text)
            except ValueError as err:
                assert "cannot be given on the command line" in str(err) and default is None, (spec.name, name)
                continue
            assert value == default and type(value) is type(default), (spec.name, name, value)
            checked += 1
    assert checked > 40


# ---- 5: a clean single image ---------------------------------------------------------------------------------

def test_one_sample_is_written_without_the_grid_border(model_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert main(["sample", "--model", str(model_dir), "--steps", "2", "--num", "1", "--out", str(out), "--quiet"]) == 0
    assert np.asarray(Image.open(out)).shape == (8, 8, 3)  # the 8×8 sample itself, ready for degrade
    degraded = tmp_path / "y.png"
    assert main(["degrade", "--task", "denoise", "--input", str(out), "--out", str(degraded)]) == 0


def test_digits_writes_a_real_digit(tmp_path, capsys):
    from diffsolve.data import digits
    from diffsolve.images import load_image

    out = tmp_path / "d.png"
    assert main(["digits", "--split", "test", "--index", "3", "--out", str(out)]) == 0
    assert "test digit 3" in capsys.readouterr().out
    expected = digits("test")[0][3:4]
    assert torch.allclose(load_image(out), expected, atol=1 / 127.5)  # one 8-bit step
    err = run_fast(["digits", "--index", "300", "--out", str(tmp_path / "e.png")], capsys)
    assert_names(err, "--index", "300")


# ---- 6: adaptive samplers in fid -------------------------------------------------------------------------

def test_fid_takes_an_adaptive_sampler_without_steps(fid_model_and_reference, tmp_path, capsys):
    model, ref = fid_model_and_reference
    base = ["fid", "--model", str(model), "--sampler", "adaptive_sde", "--num", "4", "--shard-size", "4",
            "--batch-size", "4", "--ref", str(ref), "--quiet", "--kid-subsets", "0", "--rtol", "0.5"]
    assert main(base) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert re.search(r"FID \d", out) and "NFE" in out
    err = run_fast([*base, "--steps", "10"], capsys)
    assert_names(err, "--steps", "10")
    assert "steps=None" not in err


# ---- 9, 10: progress over samples, small --num warned, KID with its scale ---------------------------------

def test_fid_shows_progress_over_samples_and_warns_about_small_num(fid_model_and_reference, tmp_path, capsys):
    model, ref = fid_model_and_reference
    assert main(["fid", "--model", str(model), "--sampler", "ddim", "--steps", "1", "--num", "8", "--shard-size",
                 "4", "--batch-size", "4", "--ref", str(ref), "--kid-subsets", "3", "--kid-subset-size", "100"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"samples: +\d+%\|.*\| \d/8 ", captured.err)  # one bar over the 8 samples, across shards
    assert "warning: --num 8: the covariance of 8 samples of 64-d features is singular" in captured.err
    assert "warning: --num 8 is below --kid-subset-size 100: KID uses subsets of 8 samples" in captured.err
    assert re.search(r"KID×10³ -?\d", captured.out)


# ---- 9: Ctrl-C -------------------------------------------------------------------------------------------

@pytest.fixture()
def interrupting_sampler():
    """A registered sampler that is interrupted at its first step, as Ctrl-C interrupts a real one."""
    from diffsolve.registry import _REGISTRY, register_sampler

    @register_sampler("interrupted_by_test")
    def interrupted(run, x):
        raise KeyboardInterrupt

    yield "interrupted_by_test"
    del _REGISTRY["interrupted_by_test"]


def test_ctrl_c_is_one_line_saying_what_is_kept(model_dir, fid_model_and_reference, tmp_path, capsys,
                                                 interrupting_sampler):
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(model_dir), "--sampler", interrupting_sampler, "--steps", "2", "--num", "2",
                 "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("diffsolve sample: interrupted; no partial file was written (files are written whole, once "
                   "done); rerun the command to start again")
    assert not out.exists()
    model, ref = fid_model_and_reference
    workdir = tmp_path / "work"
    assert main(["fid", "--model", str(model), "--sampler", interrupting_sampler, "--steps", "2", "--num", "4",
                 "--ref", str(ref), "--workdir", str(workdir), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"diffsolve fid: interrupted; finished shards are kept in {workdir}; rerun the same command "
                       "to resume") and "Traceback" not in "".join(err)


# ---- 8: help that teaches ------------------------------------------------------------------------------------

def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_and_flag_has_help():
    for name, sub in subcommands().items():
        assert sub.description, f"diffsolve {name} has no description"
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"diffsolve {name} {action.option_strings[0]} has no help"
    helps = {name: sub.format_help() for name, sub in subcommands().items()}
    for name, flag, shown in [("sample", "--num", "(default: 64)"), ("sample", "--sampler", "(default:"),
                              ("restore", "--method", "(default: dds)"), ("ems", "--n-lambda", "(default: 120)"),
                              ("fid-ref", "--kid-max", "(default: 10000)"), ("sweep", "--steps", "5,10,20"),
                              ("sample", "--seed", "(default: 0)")]:
        text = " ".join(helps[name].split("options:")[1].split())  # the flags' help, not the usage line
        help_of_flag = re.search(re.escape(flag) + r" [A-Z_]+ (.*?) --", text).group(1)
        assert shown in help_of_flag, (name, flag, help_of_flag)
    assert "ddim" in helps["sample"] and "daps_100" in helps["restore"]
    fid_num = " ".join(helps["fid"].split()).split("--num NUM, --num-samples NUM")[1][:120]
    sweep_num = " ".join(helps["sweep"].split()).split("--num NUM, --num-samples NUM")[1][:120]
    assert "10000" in fid_num and "2000" in sweep_num and fid_num != sweep_num


# ---- 12: ems reports its JVP method on resume; measurement settings; --scheduler-config --------------------

def test_ems_resumed_reports_the_jvp_method_it_used(model_dir, tmp_path, capsys):
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32))
    args = ["ems", "--model", str(model_dir), "--data", str(data), "--n-lambda", "2", "--num-samples", "4",
            "--batch-size", "4", "--checkpoint", str(tmp_path / "ck.safetensors"), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a.safetensors")]) == 0
    first = re.search(r"JVP: (\w+)", capsys.readouterr().out).group(1)
    assert first != "auto"
    assert main([*args, "--out", str(tmp_path / "b.safetensors")]) == 0  # everything done: resumed at the end
    assert f"JVP: {first}" in capsys.readouterr().out


@pytest.fixture(scope="module")
def measurement(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure")
    clean = root / "clean.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(clean)
    y = root / "y.png"
    assert main(["degrade", "--task", "inpaint_box", "--input", str(clean), "--out", str(y), "--mask-seed", "2",
                 "--sigma-y", "0.05", "--seed", "4"]) == 0
    return y


def test_degrade_stores_its_settings_in_the_measurement(measurement):
    from diffsolve.images import png_settings

    assert png_settings(measurement) == {"task": "inpaint_box", "mask_seed": 2, "sigma_y": 0.05, "noise_seed": 4}


@pytest.mark.parametrize("args,flag,value", [
    (["--mask-seed", "0"], "--mask-seed", "0"),
    (["--task", "sr4"], "--task", "sr4"),
    (["--sigma-y", "0.025"], "--sigma-y", "0.025"),
])
def test_restore_refuses_settings_other_than_the_measurements(measurement, tmp_path, capsys, args, flag, value):
    err = run_fast(["restore", "--model", NO_MODEL, "--input", str(measurement), "--out", str(tmp_path / "x.png"),
                    *args], capsys)
    assert_names(err, flag, value)
    assert f"{flag} " in err and "was made by `diffsolve degrade`" in err


def test_restore_reads_the_measurements_settings(model_dir, measurement, tmp_path, capsys):
    """Without --task, --mask-seed and --sigma-y, restore solves with degrade's: the same result as with those
    flags given (the solver's seed is the same), and not the default mask seed's."""
    out, explicit, default_mask = tmp_path / "x.png", tmp_path / "explicit.png", tmp_path / "m0.png"
    base = ["restore", "--model", str(model_dir), "--input", str(measurement), "--steps", "2", "--quiet"]
    assert main([*base, "--out", str(out)]) == 0
    assert "dds on inpaint_box" in capsys.readouterr().out
    assert main([*base, "--out", str(explicit), "--task", "inpaint_box", "--mask-seed", "2", "--sigma-y", "0.05"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(explicit)))
    plain = tmp_path / "plain.png"  # the same pixels without the metadata: the default mask seed 0
    Image.open(measurement).save(plain)
    assert main([*base[:4], str(plain), *base[5:], "--out", str(default_mask), "--task", "inpaint_box",
                 "--sigma-y", "0.05"]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(default_mask)))
    err = run_fast(["restore", "--model", NO_MODEL, "--input", str(tmp_path / "x.png"), "--out",
                    str(tmp_path / "z.png")], capsys)
    assert_names(err, "--task", "x.png")  # a PNG not from degrade: the task must be given


def test_a_unet_folder_takes_scheduler_config(tmp_path, capsys):
    unet_dir, sched_dir = tmp_path / "unet", tmp_path / "sched"
    make_tiny_unet().save_pretrained(unet_dir)
    DDPMScheduler().save_pretrained(sched_dir)
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(unet_dir), "--steps", "2", "--num", "1", "--out", str(out), "--quiet"]) == 2
    assert "--scheduler-config" in capsys.readouterr().err
    assert main(["sample", "--model", str(unet_dir), "--scheduler-config", str(sched_dir), "--steps", "2", "--num",
                 "1", "--out", str(out), "--quiet"]) == 0


@pytest.fixture()
def unet_only_digit_model(fid_model_and_reference, tmp_path):
    """The FID tests' digit model split as a user may have it: a folder with only the UNet, and its scheduler
    config elsewhere (returns the two folders and the reference statistics)."""
    import shutil

    model, ref = fid_model_and_reference
    unet_dir, sched_dir = tmp_path / "unet", tmp_path / "sched"
    shutil.copytree(model / "unet", unet_dir)
    shutil.copytree(model / "scheduler", sched_dir)
    return unet_dir, sched_dir, ref


def test_fid_takes_scheduler_config_for_a_unet_folder(unet_only_digit_model, tmp_path, capsys):
    unet_dir, sched_dir, ref = unet_only_digit_model
    work = tmp_path / "work"
    base = ["fid", "--model", str(unet_dir), "--sampler", "ddim", "--steps", "2", "--num", "4", "--shard-size", "4",
            "--batch-size", "4", "--ref", str(ref), "--features", "digits", "--quiet", "--kid-subsets", "0"]
    err = run_fast([*base[:2], NO_MODEL, *base[3:], "--scheduler-config", str(tmp_path / "none.json")], capsys)
    assert_names(err, "--scheduler-config", "none.json")
    assert main(base) == 2
    assert "--scheduler-config" in capsys.readouterr().err
    assert main([*base, "--scheduler-config", str(sched_dir), "--workdir", str(work)]) == 0
    assert re.search(r"FID \d", capsys.readouterr().out)
    settings = (work / "settings.json").read_text()
    assert str((sched_dir / "scheduler_config.json").resolve()) in settings
    # another noise schedule, even in the same file, is another setting: the workdir's shards are not reused
    config = sched_dir / "scheduler_config.json"
    edited = config.read_text().replace('"beta_end": 0.02', '"beta_end": 0.03')
    assert edited != config.read_text()
    config.write_text(edited)
    assert main([*base, "--scheduler-config", str(sched_dir), "--workdir", str(work)]) == 2
    assert "made with other settings" in capsys.readouterr().err


# ---- 13: no spurious diffusers warning on --device cpu ------------------------------------------------------

def test_device_cpu_loads_without_the_float32_warning(model_dir, tmp_path):
    with diffusers_log() as messages:
        assert main(["sample", "--model", str(model_dir), "--device", "cpu", "--steps", "1", "--num", "1", "--out",
                     str(tmp_path / "x.png"), "--quiet"]) == 0
    assert not [m for m in messages if "kept in float32" in m]


# ---- 7: examples never overwrite shipped (or any existing) files ------------------------------------------

def run_example(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # two interpreter start-ups (torch, diffusers) per example
@pytest.mark.parametrize("name,shipped", [("train_digits16.py", "diffsolve/models/digits16"),
                                          ("train_digits_features.py", "diffsolve/models/digits_features.safetensors")])
def test_examples_default_to_a_new_folder_and_refuse_to_overwrite(name, shipped):
    helped = run_example(name, "--help")
    assert helped.returncode == 0 and "(default: runs/" in " ".join(helped.stdout.split()) and "--force" in helped.stdout
    before = (ROOT / shipped).stat().st_mtime_ns
    refused = run_example(name, "--out", shipped)
    assert refused.returncode == 2
    assert f"--out {shipped} exists; pass --force to replace it" in refused.stderr
    assert (ROOT / shipped).stat().st_mtime_ns == before
