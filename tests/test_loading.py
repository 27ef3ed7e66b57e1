"""load_model on real diffusers folders built from configs (no network: HF_HUB_OFFLINE is set in conftest)."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from diffsolve import load_model, sample

from conftest import assert_cast_copy, diffusers_log, make_tiny_unet


@pytest.fixture
def pipeline_dir(tmp_path):
    unet = make_tiny_unet(seed=3)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    return tmp_path / "pipe", unet, scheduler


def test_pipeline_folder(pipeline_dir):
    folder, unet, scheduler = pipeline_dir
    model = load_model(folder)
    assert model.prediction == "v" and model.sample_shape == (3, 8, 8) and model.num_classes is None
    for (name, p), q in zip(model.net.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(p, q), name
    n = torch.arange(1000)
    assert torch.allclose(model.schedule.alpha(model.schedule.timestep_to_t(n)) ** 2,
                          scheduler.alphas_cumprod.double(), rtol=1e-14)
    x = sample(model, "dpm_solver_pp", 3, seeds=[0, 1])
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    assert load_model(folder, prediction="epsilon").prediction == "epsilon"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_through_diffusers_without_its_cast_warning(pipeline_dir, dtype):
    """dtype= goes to diffusers' from_pretrained (which keeps a model's float32-only modules), not to a later
    .to(dtype), which logs "should be kept in float32" even when there are none; the weights are the float32
    ones rounded, in a pipeline folder and in a UNet folder alike."""
    folder, unet, scheduler = pipeline_dir
    for source, kw in ((folder, {}), (folder / "unet", {"scheduler_config": scheduler.config})):
        with diffusers_log() as messages:
            model = load_model(source, dtype=dtype, device="cpu", **kw)
        assert not [m for m in messages if "float32" in m], messages
        assert model.dtype == dtype
        assert_cast_copy(model.net, unet, dtype)


def test_unet_folder_with_scheduler_config(pipeline_dir, tmp_path):
    folder, unet, scheduler = pipeline_dir
    unet_dir = folder / "unet"
    with pytest.raises(ValueError, match="without a scheduler config: pass scheduler_config="):
        load_model(unet_dir)
    model = load_model(unet_dir, scheduler_config=scheduler.config)
    assert model.prediction == "v"
    model = load_model(unet_dir, scheduler_config=folder / "scheduler" / "scheduler_config.json")
    assert model.prediction == "v"
    (unet_dir / "scheduler_config.json").write_text((folder / "scheduler" / "scheduler_config.json").read_text())
    assert load_model(unet_dir).prediction == "v"
    with pytest.raises(FileNotFoundError, match="no scheduler config file"):
        load_model(unet_dir, scheduler_config=tmp_path / "missing.json")


def test_errors(tmp_path, pipeline_dir):
    with pytest.raises(FileNotFoundError, match="model folder not found: 'no/such/folder/here'"):
        load_model("no/such/folder/here")
    with pytest.raises(FileNotFoundError, match="could not fetch the hub model 'someone/some-model'.*local folder"):
        load_model("someone/some-model")
    with pytest.raises(TypeError, match=r"source: expected .*got a UNet2DModel; wrap .* DiffusionModel\(net, schedule\)"):
        load_model(make_tiny_unet())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a diffusers pipeline folder"):
        load_model(tmp_path / "empty")
    folder, unet, _ = pipeline_dir
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_model(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="this one is a UNet2DConditionModel"):
        load_model(folder)
