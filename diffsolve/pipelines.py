"""Pretrained diffusers pipelines driven by diffsolve: Stable-Diffusion-style text-to-image models in latent
space, and :class:`FixedClassUNet` for running a class-conditional UNet in a diffusers pipeline that passes no
class labels.

A Stable-Diffusion-style pipeline folder (``model_index.json`` naming ``unet`` = ``UNet2DConditionModel``,
``vae`` = ``AutoencoderKL``, ``text_encoder`` + ``tokenizer`` from transformers, e.g. CLIP, and a
``scheduler``) loads through :func:`diffsolve.load_model` as a :class:`TextToImageModel`: a
:class:`~diffsolve.DiffusionModel` over the UNet's latents that also holds the pipeline's own text encoder,
tokenizer and VAE. ``diffsolve.sample(model, sampler, steps, prompt=[...], negative_prompt=...,
guidance_scale=...)`` then

1. tokenizes and encodes the prompts exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does
   (padding to the tokenizer's ``model_max_length``, the text encoder's last hidden state; the negative
   prompt, or the empty prompt when none is given, for classifier-free guidance);
2. samples latents with any registered sampler, the guided pass batched into one UNet forward of 2·batch
   latents (unconditional first, as diffusers);
3. decodes them with the VAE (``latents / scaling_factor``) and returns images in [−1, 1], shape
   (batch, 3, H, W) (``decode=False`` returns the latents).

Without a prompt the model samples unconditionally (the empty prompt, as diffusers' unconditional branch).
Not supported: SDXL-style pipelines (a second text encoder, added time/text embeddings), LCM guidance
embeddings, IP adapters, LoRA scales, ``clip_skip``; inverse problems and inversion in latent space.

transformers is needed for the text encoder and tokenizer: ``pip install 'diffsolve[pipelines]'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .model import DiffusionModel, TextConditioning
from .schedules import NoiseSchedule

Tensor = torch.Tensor

#: the component classes a text-to-image pipeline folder must name (model_index.json)
_TEXT_PIPELINE_PARTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",)}
_UNSUPPORTED_PARTS = ("text_encoder_2", "tokenizer_2", "transformer", "prior", "image_encoder")


class TextToImageModel(DiffusionModel):
    """A Stable-Diffusion-style pipeline as a diffsolve model: samples live in the UNet's latent space.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (cross-attention on text embeddings).
        schedule, prediction: as :class:`~diffsolve.DiffusionModel`.
        vae: the pipeline's ``AutoencoderKL`` (decodes ``latents / vae.config.scaling_factor``).
        text_encoder, tokenizer: the pipeline's transformers text encoder and tokenizer.
    """

    #: samples are latents; ``sample`` decodes them with the VAE
    is_latent = True

    def __init__(self, unet, schedule: NoiseSchedule, prediction: str = "epsilon", *, vae, text_encoder, tokenizer):
        super().__init__(unet, schedule, prediction)
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self._null_embeds: dict = {}

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """The shape of one decoded image (C, H, W)."""
        if self.sample_shape is None:
            return None
        return (int(self.vae.config.out_channels), *(s * self.vae_scale_factor for s in self.sample_shape[1:]))

    # ---- conditioning ----------------------------------------------------------------------------------
    def check_conditioning(self, batch: int, class_labels, guidance_scale: float):
        if class_labels is not None:
            raise ValueError("class_labels were given, but this model is text-conditional: pass prompt=[...] instead")
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs a prompt (guidance mixes the prompt's and the "
                             "negative/empty prompt's predictions)")
        return None

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder embeddings (batch, tokens, dim) of ``prompts``, as diffusers' Stable Diffusion pipeline
        computes them (padded to ``tokenizer.model_max_length``, truncated, last hidden state)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        embeds = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=self.text_encoder.dtype, device=self.device)

    def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None,
                     guidance_scale: float) -> TextConditioning:
        """The :class:`TextConditioning` of a batch: prompt embeddings and, for guidance, those of the negative
        prompts (the empty prompt for every sample when none are given)."""
        cond = self.encode_prompt(prompts)
        if guidance_scale == 1.0:
            return TextConditioning(cond, None)
        negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        return TextConditioning(cond, self.encode_prompt(negatives))

    def output(self, x: Tensor, t: Tensor, class_labels=None, guidance_scale: float = 1.0,
               net_time: Tensor | None = None) -> Tensor:
        """The raw UNet output; without conditioning (e.g. from EMS computation) the empty prompt's."""
        if class_labels is None:
            key = (x.shape[0], x.device)
            if key not in self._null_embeds:
                self._null_embeds = {key: self.encode_prompt([""] * x.shape[0])}
            class_labels = TextConditioning(self._null_embeds[key])
            guidance_scale = 1.0
        return super().output(x, t, class_labels, guidance_scale, net_time)

    # ---- decoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images in [−1, 1] (not clamped), as the pipeline's ``vae.decode(latents / scaling_factor)``."""
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.scaling_factor).sample

    def __repr__(self) -> str:
        return (f"TextToImageModel(unet={type(self.net).__name__}, text_encoder={type(self.text_encoder).__name__}, "
                f"schedule={self.schedule!r}, prediction={self.prediction!r}, latent_shape={self.sample_shape}, "
                f"image_shape={self.image_shape})")


def check_prompts(model: DiffusionModel, batch: int, prompt, negative_prompt, class_labels,
                  guidance_scale: float) -> tuple[list[str], list[str] | None] | None:
    """Validate text conditioning for a batch (no network call). Returns ``(prompts, negative_prompts)`` for a
    text-conditional model (the empty prompt when none is given), None for any other model."""
    text_model = isinstance(model, TextToImageModel)
    if not text_model:
        if prompt is not None or negative_prompt is not None:
            name = "prompt" if prompt is not None else "negative_prompt"
            raise ValueError(f"{name} was given, but the model is not text-conditional (it has no text encoder; "
                             "load a Stable-Diffusion-style pipeline folder for text prompts)")
        return None
    if class_labels is not None:
        raise ValueError("class_labels were given, but this model is text-conditional: pass prompt=[...] instead")
    if prompt is None:
        if negative_prompt is not None or guidance_scale != 1.0:
            raise ValueError("negative_prompt and guidance_scale != 1 need a prompt (guidance mixes the prompt's and "
                             "the negative prompt's predictions)")
        return [""] * batch, None
    prompts = _prompt_list("prompt", prompt, batch)
    negatives = None
    if negative_prompt is not None:
        if guidance_scale == 1.0:
            raise ValueError("negative_prompt acts only through classifier-free guidance: set guidance_scale != 1 "
                             "(diffusers' pipelines use 7.5)")
        negatives = _prompt_list("negative_prompt", negative_prompt, batch)
    return prompts, negatives


def _prompt_list(name: str, value, batch: int) -> list[str]:
    if isinstance(value, str):
        return [value] * batch
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name}: expected a string or a list of strings, got {type(value).__name__}")
    if len(value) == 1:
        return list(value) * batch
    if len(value) != batch:
        raise ValueError(f"{name}: expected 1 or {batch} prompts (one per sample), got {len(value)}")
    return list(value)


# ---- loading -------------------------------------------------------------------------------------------


def is_text_pipeline(index: dict) -> bool:
    """Whether a model_index.json describes a text-conditional (Stable-Diffusion-style) pipeline."""
    return "text_encoder" in index or "vae" in index or "tokenizer" in index


def _class_name(index: dict, part: str) -> str | None:
    entry = index.get(part)
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def _require_safetensors(folder: Path) -> None:
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no .safetensors weights (diffsolve loads safetensors only; convert .bin "
                                "weights with save_pretrained(safe_serialization=True))")


def load_text_pipeline(folder: Path, index: dict, schedule: NoiseSchedule, prediction: str, *, device=None,
                       dtype=None) -> TextToImageModel:
    """Load a Stable-Diffusion-style pipeline folder (see the module docstring) as a :class:`TextToImageModel`."""
    extra = [p for p in _UNSUPPORTED_PARTS if index.get(p) not in (None, [None, None])]
    if extra:
        raise ValueError(f"{folder}: pipelines with {', '.join(extra)} (e.g. SDXL, SD3, Kandinsky) are not supported; "
                         "diffsolve loads Stable-Diffusion-style pipelines with one text encoder, a "
                         "UNet2DConditionModel and an AutoencoderKL")
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if _class_name(index, part) is None:
            raise ValueError(f"{folder}/model_index.json names no {part!r}: a text-to-image pipeline needs unet, vae, "
                             f"text_encoder and tokenizer (found {sorted(k for k in index if not k.startswith('_'))})")
    for part, allowed in _TEXT_PIPELINE_PARTS.items():
        if _class_name(index, part) not in allowed:
            raise ValueError(f"{folder}: the pipeline's {part} is a {_class_name(index, part)}; diffsolve loads "
                             f"{' / '.join(allowed)} there")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("loading a text-to-image pipeline needs transformers (its text encoder and tokenizer): "
                          "pip install 'diffsolve[pipelines]'") from err
    import diffusers

    with open(folder / "unet" / "config.json") as f:
        unet_config = json.load(f)
    for key, what in (("addition_embed_type", "added text/time embeddings (SDXL-style)"),
                      ("time_cond_proj_dim", "a guidance-scale embedding (LCM-style)"),
                      ("encoder_hid_dim_type", "an image/text projection of the encoder states")):
        if unet_config.get(key) is not None:
            raise ValueError(f"{folder}/unet: a UNet with {key}={unet_config[key]!r} ({what}) is not supported")

    for part in ("unet", "vae", "text_encoder"):
        _require_safetensors(folder / part)
    # dtype goes to from_pretrained (which keeps a model's float32-only modules; a later .to(dtype) warns);
    # transformers takes the same torch_dtype keyword from 4.x on
    cast = {} if dtype is None else {"torch_dtype": dtype}
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True,
                                                          low_cpu_mem_usage=False, **cast)
    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, low_cpu_mem_usage=False,
                                                  **cast)
    te_cls_name = _class_name(index, "text_encoder")
    te_cls = getattr(transformers, te_cls_name, None)
    if te_cls is None:
        raise ValueError(f"{folder}: text_encoder class {te_cls_name!r} is not in transformers")
    text_encoder = te_cls.from_pretrained(folder / "text_encoder", use_safetensors=True, **cast)
    tok_cls = getattr(transformers, _class_name(index, "tokenizer"), None) or transformers.AutoTokenizer
    tokenizer = tok_cls.from_pretrained(folder / "tokenizer")
    modules = [unet.eval().requires_grad_(False), vae.eval().requires_grad_(False),
               text_encoder.eval().requires_grad_(False)]
    if device is not None:
        for m in modules:
            m.to(device=device)
    return TextToImageModel(unet, schedule, prediction, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


# ---- a class-conditional UNet in a pipeline that passes no labels -------------------------------------------


class FixedClassUNet(torch.nn.Module):
    """A class-conditional diffusers UNet that every call gives one fixed class label.

    diffusers' ``DDPMPipeline`` (and other unconditional pipelines) call ``unet(x, t).sample`` without
    ``class_labels``, which a class-conditional ``UNet2DModel`` refuses. Wrapped, it runs there: with
    ``class_label=None`` (default) it receives the null class ``num_class_embeds − 1`` — the unconditional
    model, exactly what ``diffsolve.sample`` evaluates for such a model without ``class_labels`` — or the
    given class. The wrapper has no weights of its own: ``config``, ``dtype`` and ``device`` are the UNet's.

        pipe = DDPMPipeline(unet=FixedClassUNet(load_model("digits16").net), scheduler=...)
    """

    def __init__(self, unet: torch.nn.Module, class_label: int | None = None):
        super().__init__()
        n = getattr(getattr(unet, "config", None), "num_class_embeds", None)
        if not n:
            raise ValueError("FixedClassUNet wraps a class-conditional UNet (config.num_class_embeds), got "
                             f"{type(unet).__name__} without class embeddings")
        label = n - 1 if class_label is None else class_label
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
            raise ValueError(f"class_label: expected an integer in [0, {n - 1}] ({n - 1} is the null class), got "
                             f"{class_label!r}")
        self.unet, self.class_label = unet, label

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: Tensor, timestep, class_labels: Tensor | None = None, return_dict: bool = True, **kw):
        if class_labels is None:
            class_labels = torch.full((sample.shape[0],), self.class_label, dtype=torch.long, device=sample.device)
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=return_dict, **kw)
