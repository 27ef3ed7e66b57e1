"""``load_model``: pretrained diffusers models (pipeline folder, UNet folder + scheduler config, hub id), the
shipped ``digits16`` model and guided-diffusion checkpoints (:mod:`diffsolve.adm`), as a
:class:`~diffsolve.DiffusionModel`. Weights are read from safetensors, or from a guided-diffusion state dict with
``torch.load(weights_only=True)``: nothing is unpickled beyond tensors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .model import DiffusionModel
from .schedules import DiscreteVP

SHIPPED = {"digits16": Path(__file__).parent / "models" / "digits16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNET_CLASSES = ("UNet2DModel",)


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def scheduler_config_path(path: str | Path) -> Path:
    """A scheduler_config.json given as itself or as its folder; FileNotFoundError if there is none."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"scheduler_config: no scheduler config file at {path}")
    return path


def _scheduler_config(scheduler_config) -> dict:
    if isinstance(scheduler_config, (str, Path)):
        return _read_json(scheduler_config_path(scheduler_config))
    return dict(getattr(scheduler_config, "config", scheduler_config))


def _load_unet(folder: Path, subfolder: str | None, dtype: torch.dtype | None = None):
    import diffusers

    config_path = folder / (subfolder or "") / "config.json"
    class_name = _read_json(config_path).get("_class_name", "UNet2DModel")
    if class_name not in _UNET_CLASSES:
        raise ValueError(f"{config_path}: diffsolve loads {', '.join(_UNET_CLASSES)} networks, this one is a {class_name} "
                         "(a UNet2DConditionModel loads as part of a Stable-Diffusion-style pipeline folder with vae, "
                         "text_encoder and tokenizer)")
    weights = list((folder / (subfolder or "")).glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder / (subfolder or '')}: no .safetensors weights (diffsolve loads safetensors "
                                "only; convert .bin weights with diffusers' save_pretrained(safe_serialization=True))")
    cls = getattr(diffusers, class_name)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if dtype is not None:  # diffusers' own cast (it keeps a model's float32-only modules; a later .to() warns)
        kwargs["torch_dtype"] = dtype
    return cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False, **kwargs)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as err:  # offline, unknown repo, no network: all end the same way for the user
        raise FileNotFoundError(
            f"could not fetch the hub model {repo_id!r} ({type(err).__name__}: {err}). Without network access, "
            f"download it on another machine and pass its local folder to load_model instead.") from err


def load_model(source: str | Path, *, scheduler_config=None, prediction: str | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               adm: str | dict | None = None) -> DiffusionModel:
    """Load a pretrained diffusers model as a :class:`~diffsolve.DiffusionModel`.

    ``source`` is ``"digits16"`` (the shipped model), a diffusers pipeline folder (``model_index.json`` with
    ``unet/`` and ``scheduler/``; a Stable-Diffusion-style one with ``vae/``, ``text_encoder/`` and
    ``tokenizer/`` loads as a :class:`~diffsolve.pipelines.TextToImageModel`, which needs transformers), a
    UNet folder (``config.json`` + safetensors; give ``scheduler_config``
    as a dict, a diffusers scheduler or a path unless the folder has a ``scheduler_config.json``), or a
    hub id ``owner/name`` (downloaded through huggingface_hub; offline this is a clear error), or a
    guided-diffusion (ADM) checkpoint ``.pt``/``.pth`` such as DPS's ``ffhq_10m.pt``, converted to a diffusers
    ``UNet2DModel`` (:mod:`diffsolve.adm`). ``adm`` names its preset (``"ffhq256-dps"``, ...) or gives the
    settings the state dict does not fix as a dict (``image_size``, ``num_heads``, ``num_head_channels``,
    ``use_new_attention_order``, ``noise_schedule``, and optionally ``preset``); by default the presets that fit
    the state dict supply them. ``prediction`` overrides the scheduler config's ``prediction_type``.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected 'digits16', a folder, a hub id or a .pt/.pth file, got a "
                        f"{type(source).__name__}; wrap a network already in memory with DiffusionModel(net, schedule)")
    source_str = str(source)
    if Path(source_str).is_file() or Path(source_str).suffix in (".pt", ".pth"):
        from .adm import load_adm

        if scheduler_config is not None:
            raise ValueError("scheduler_config: a guided-diffusion checkpoint's noise schedule comes from its preset "
                             "or adm={'noise_schedule': 'linear' | 'cosine'}")
        settings = {"preset": adm} if isinstance(adm, str) or adm is None else dict(adm)
        return load_adm(source_str, prediction=prediction, device=device, dtype=dtype, **settings)
    if adm is not None:
        raise ValueError(f"adm: settings for a guided-diffusion checkpoint file, but {source_str!r} is not a file")
    folder = SHIPPED.get(source_str, Path(source_str))
    if not folder.exists():
        if source_str in SHIPPED:
            raise FileNotFoundError(f"the shipped model {source_str!r} is missing at {folder}: train it with "
                                    "examples/train_digits16.py")
        if _HUB_ID.match(source_str) and not source_str.startswith((".", "/")):
            folder = _download(source_str)
        else:
            raise FileNotFoundError(f"model folder not found: {source_str!r} (expected 'digits16', a diffusers "
                                    "pipeline or UNet folder, or a hub id owner/name)")

    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        if "unet" not in index or "scheduler" not in index:
            raise ValueError(f"{folder}/model_index.json names no 'unet' and 'scheduler' (found {sorted(index)})")
        config = _scheduler_config(folder / "scheduler") if scheduler_config is None else _scheduler_config(scheduler_config)
        from .pipelines import is_text_pipeline, load_text_pipeline

        if is_text_pipeline(index):  # Stable-Diffusion-style: text encoder + UNet2DConditionModel + VAE
            schedule = DiscreteVP.from_config(config)
            return load_text_pipeline(folder, index, schedule, prediction or schedule.prediction_type or "epsilon",
                                      device=device, dtype=dtype)
        unet = _load_unet(folder, "unet", dtype)
    elif (folder / "config.json").is_file():
        if scheduler_config is None:
            if not (folder / "scheduler_config.json").is_file():
                raise ValueError(f"{folder} holds a UNet without a scheduler config: pass scheduler_config= (a dict, "
                                 "a diffusers scheduler, or a path to scheduler_config.json; on the command line "
                                 "--scheduler-config)")
            scheduler_config = folder
        unet = _load_unet(folder, None, dtype)
        config = _scheduler_config(scheduler_config)
    else:
        raise FileNotFoundError(f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a UNet "
                                "folder (config.json)")

    unet = unet.eval().requires_grad_(False)
    if device is not None:  # the device only: diffusers warns about float32 modules whenever `dtype` is passed
        unet = unet.to(device=device)
    schedule = DiscreteVP.from_config(config)
    return DiffusionModel(unet, schedule, prediction or schedule.prediction_type or "epsilon")
