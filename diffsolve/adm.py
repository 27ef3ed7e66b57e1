"""Guided-diffusion ("ADM") checkpoints as diffusers ``UNet2DModel`` networks.

OpenAI's guided-diffusion ``UNetModel`` (Dhariwal & Nichol 2021) is the network of the checkpoints people restore
images with: DPS's and DAPS's FFHQ model ``ffhq_10m.pt`` and guided-diffusion's ImageNet and LSUN models. They
are plain state dicts; :func:`convert_adm` maps one onto a diffusers ``UNet2DModel`` (the layout diffusers' own
consistency-model converter uses: scale-shift ResNet blocks, ResNet or convolution up/down-sampling, attention
after every ResNet of the attention levels) with weights converted so that the network computes the same function.

What the state dict fixes is read from it (channels, channel multipliers, res blocks per level, attention levels,
learned σ, class conditioning, resblock up/down, scale-shift norm). What it does not (image size, attention heads
by count or by channels, legacy or new q/k/v order, noise schedule) comes from a named preset (:data:`PRESETS`,
the flags published with each checkpoint) or explicit arguments; without either, the presets whose architecture
fits the state dict are used when they agree.

What ``UNet2DModel`` cannot express is an error, not an approximation: one attention head width for the whole
network (a fixed head *count* over levels of different widths, as guided-diffusion's 128×128 model has, gives
several) and a first channel multiplier of 1 (the sinusoidal time embedding has the first level's width).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

Tensor = torch.Tensor

#: the flags each checkpoint was published with (guided-diffusion's README, DPS's configs/model_config.yaml),
#: in guided-diffusion's ``create_model`` vocabulary
PRESETS: dict[str, dict] = {
    # DPS / DAPS ffhq_10m.pt: 93.6 M parameters
    "ffhq256-dps": dict(image_size=256, num_channels=128, num_res_blocks=1, channel_mult="", learn_sigma=True,
                        class_cond=False, attention_resolutions="16", num_heads=4, num_head_channels=64,
                        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
                        noise_schedule="linear"),
    # 256x256_diffusion_uncond.pt
    "imagenet256-uncond": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="",
                               learn_sigma=True, class_cond=False, attention_resolutions="32,16,8", num_heads=4,
                               num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                               use_new_attention_order=False, noise_schedule="linear"),
    # 256x256_diffusion.pt
    "imagenet256-cond": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
                             class_cond=True, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                             use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
                             noise_schedule="linear"),
    # 128x128_diffusion.pt: 4 heads of 128, 192 and 256 channels, which UNet2DModel cannot express
    "imagenet128-cond": dict(image_size=128, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
                             class_cond=True, attention_resolutions="32,16,8", num_heads=4, num_head_channels=-1,
                             use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
                             noise_schedule="linear"),
    # 64x64_diffusion.pt
    "imagenet64-cond": dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", learn_sigma=True,
                            class_cond=True, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                            use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
                            noise_schedule="cosine"),
    # lsun_bedroom.pt, lsun_cat.pt, lsun_horse.pt (dropout 0.1 in training; no effect at inference)
    "lsun256": dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
                    class_cond=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
                    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
                    noise_schedule="linear"),
}

#: guided-diffusion's default channel multipliers per image size (``channel_mult=""``)
_DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
#: the settings a state dict does not determine
SETTINGS = ("image_size", "num_heads", "num_head_channels", "use_new_attention_order", "noise_schedule")
_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm(32, channels), eps 1e-5


@dataclass(frozen=True)
class ADMConfig:
    """One guided-diffusion ``UNetModel``: its architecture (what the state dict determines) and the settings it
    does not (:data:`SETTINGS`)."""

    in_channels: int
    out_channels: int
    model_channels: int
    #: channels of each level (guided-diffusion's ``int(mult * model_channels)``)
    level_channels: tuple[int, ...]
    num_res_blocks: int
    #: levels (0 = full resolution) whose res blocks are followed by attention
    attention_levels: tuple[int, ...]
    use_scale_shift_norm: bool
    resblock_updown: bool
    num_classes: int | None
    image_size: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    noise_schedule: str = "linear"

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    def architecture(self) -> "ADMConfig":
        """This config with the settings the state dict does not determine reset to their defaults."""
        return replace(self, **{f.name: f.default for f in fields(self) if f.name in SETTINGS})

    def heads(self, channels: int) -> int:
        if self.num_head_channels == -1:
            return self.num_heads
        return channels // self.num_head_channels


def config_from_flags(flags: dict, in_channels: int = 3) -> ADMConfig:
    """An :class:`ADMConfig` from guided-diffusion ``create_model`` flags (those of :data:`PRESETS`)."""
    size = int(flags["image_size"])
    mult = flags.get("channel_mult", "")
    mult = _DEFAULT_MULT[size] if mult == "" else tuple(float(m) for m in str(mult).split(","))
    mc = int(flags["num_channels"])
    ds = [size // int(r) for r in str(flags.get("attention_resolutions", "16")).split(",")]
    return ADMConfig(
        in_channels=in_channels, out_channels=2 * in_channels if flags.get("learn_sigma") else in_channels,
        model_channels=mc, level_channels=tuple(int(m * mc) for m in mult),
        num_res_blocks=int(flags["num_res_blocks"]),
        attention_levels=tuple(level for level in range(len(mult)) if 2**level in ds),
        use_scale_shift_norm=bool(flags.get("use_scale_shift_norm", False)),
        resblock_updown=bool(flags.get("resblock_updown", False)),
        num_classes=1000 if flags.get("class_cond") else None, image_size=size,
        num_heads=int(flags.get("num_heads", 1)), num_head_channels=int(flags.get("num_head_channels", -1)),
        use_new_attention_order=bool(flags.get("use_new_attention_order", False)),
        noise_schedule=flags.get("noise_schedule", "linear"))


# ---- the state dict's layout ------------------------------------------------------------------------------

def _resblock(adm: str, new: str, c_in: int, c_out: int, emb: int, scale_shift: bool):
    """(adm key, diffusers key, shape) of one guided-diffusion ResBlock / diffusers ResnetBlock2D."""
    yield from [
        (f"{adm}.in_layers.0.weight", f"{new}.norm1.weight", (c_in,)),
        (f"{adm}.in_layers.0.bias", f"{new}.norm1.bias", (c_in,)),
        (f"{adm}.in_layers.2.weight", f"{new}.conv1.weight", (c_out, c_in, 3, 3)),
        (f"{adm}.in_layers.2.bias", f"{new}.conv1.bias", (c_out,)),
        (f"{adm}.emb_layers.1.weight", f"{new}.time_emb_proj.weight", ((2 if scale_shift else 1) * c_out, emb)),
        (f"{adm}.emb_layers.1.bias", f"{new}.time_emb_proj.bias", ((2 if scale_shift else 1) * c_out,)),
        (f"{adm}.out_layers.0.weight", f"{new}.norm2.weight", (c_out,)),
        (f"{adm}.out_layers.0.bias", f"{new}.norm2.bias", (c_out,)),
        (f"{adm}.out_layers.3.weight", f"{new}.conv2.weight", (c_out, c_out, 3, 3)),
        (f"{adm}.out_layers.3.bias", f"{new}.conv2.bias", (c_out,)),
    ]
    if c_in != c_out:
        yield f"{adm}.skip_connection.weight", f"{new}.conv_shortcut.weight", (c_out, c_in, 1, 1)
        yield f"{adm}.skip_connection.bias", f"{new}.conv_shortcut.bias", (c_out,)


def _attention(adm: str, new: str, c: int):
    yield f"{adm}.norm.weight", f"{new}.group_norm.weight", (c,)
    yield f"{adm}.norm.bias", f"{new}.group_norm.bias", (c,)
    yield f"{adm}.qkv.weight", f"{new}.to_qkv.weight", (3 * c, c, 1)  # split into to_q/k/v by _convert_qkv
    yield f"{adm}.qkv.bias", f"{new}.to_qkv.bias", (3 * c,)
    yield f"{adm}.proj_out.weight", f"{new}.to_out.0.weight", (c, c, 1)
    yield f"{adm}.proj_out.bias", f"{new}.to_out.0.bias", (c,)


def _resample(adm: str, new: str, c: int, cfg: ADMConfig, emb: int):
    if cfg.resblock_updown:
        yield from _resblock(adm, new, c, c, emb, cfg.use_scale_shift_norm)
    else:  # guided-diffusion's Downsample names its convolution op, Upsample conv
        name = "op" if "input_blocks" in adm else "conv"
        yield f"{adm}.{name}.weight", f"{new}.conv.weight", (c, c, 3, 3)
        yield f"{adm}.{name}.bias", f"{new}.conv.bias", (c,)


def layout(cfg: ADMConfig):
    """Every parameter of the guided-diffusion ``UNetModel`` ``cfg`` describes, in its module order, as
    (guided-diffusion key, diffusers ``UNet2DModel`` key, shape): guided-diffusion's ``UNetModel.__init__`` walked
    level by level, beside the diffusers block that takes each module."""
    mc, emb, ch = cfg.model_channels, 4 * cfg.model_channels, cfg.level_channels
    nrb, levels, ss = cfg.num_res_blocks, len(ch), cfg.use_scale_shift_norm
    yield "time_embed.0.weight", "time_embedding.linear_1.weight", (emb, mc)
    yield "time_embed.0.bias", "time_embedding.linear_1.bias", (emb,)
    yield "time_embed.2.weight", "time_embedding.linear_2.weight", (emb, emb)
    yield "time_embed.2.bias", "time_embedding.linear_2.bias", (emb,)
    if cfg.num_classes is not None:
        yield "label_emb.weight", "class_embedding.weight", (cfg.num_classes, emb)
    yield "input_blocks.0.0.weight", "conv_in.weight", (ch[0], cfg.in_channels, 3, 3)
    yield "input_blocks.0.0.bias", "conv_in.bias", (ch[0],)
    block, c_prev = 1, ch[0]
    for level, c in enumerate(ch):
        for j in range(nrb):
            yield from _resblock(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", c_prev, c, emb, ss)
            if level in cfg.attention_levels:
                yield from _attention(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", c)
            block, c_prev = block + 1, c
        if level < levels - 1:
            yield from _resample(f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0", c, cfg, emb)
            block += 1
    yield from _resblock("middle_block.0", "mid_block.resnets.0", ch[-1], ch[-1], emb, ss)
    yield from _attention("middle_block.1", "mid_block.attentions.0", ch[-1])
    yield from _resblock("middle_block.2", "mid_block.resnets.1", ch[-1], ch[-1], emb, ss)
    skips = [ch[0]] + [c for level, c in enumerate(ch) for _ in range(nrb + (level < levels - 1))]
    block, c_prev = 0, ch[-1]
    for up, level in enumerate(reversed(range(levels))):
        c = ch[level]
        for j in range(nrb + 1):
            prefix = f"output_blocks.{block}"
            yield from _resblock(f"{prefix}.0", f"up_blocks.{up}.resnets.{j}", c_prev + skips.pop(), c, emb, ss)
            sub = 1
            if level in cfg.attention_levels:
                yield from _attention(f"{prefix}.1", f"up_blocks.{up}.attentions.{j}", c)
                sub = 2
            if level > 0 and j == nrb:
                yield from _resample(f"{prefix}.{sub}", f"up_blocks.{up}.upsamplers.0", c, cfg, emb)
            block, c_prev = block + 1, c
    yield "out.0.weight", "conv_norm_out.weight", (ch[0],)
    yield "out.0.bias", "conv_norm_out.bias", (ch[0],)
    yield "out.2.weight", "conv_out.weight", (cfg.out_channels, ch[0], 3, 3)
    yield "out.2.bias", "conv_out.bias", (cfg.out_channels,)


def mismatch(cfg: ADMConfig, state: dict[str, Tensor]) -> str | None:
    """The first way ``state`` differs from the network ``cfg`` describes (a missing key, a key of another
    shape, an unexpected key), or None when it fits."""
    expected = {}
    for key, _, shape in layout(cfg):
        expected[key] = shape
        if key not in state:
            return f"key {key!r} (shape {shape}) is missing"
        if tuple(state[key].shape) != shape:
            return f"key {key!r} has shape {tuple(state[key].shape)}, expected {shape}"
    extra = [k for k in state if k not in expected]
    return f"unexpected key {extra[0]!r} (shape {tuple(state[extra[0]].shape)})" if extra else None


# ---- reading a state dict ---------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A guided-diffusion state dict from ``path``, read with ``torch.load(weights_only=True)`` (no arbitrary
    objects are unpickled); a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ADM checkpoint not found: {path}")
    if path.suffix in (".safetensors", ".json"):
        raise ValueError(f"{path}: a {path.suffix} file is not a guided-diffusion checkpoint (.pt/.pth state dict); "
                         "to load a diffusers model pass its folder (the one holding model_index.json)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, arbitrary pickles (refused by weights_only), not a torch file at all
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path}: not a PyTorch state dict that torch.load(weights_only=True) can read "
                         f"({type(err).__name__}: {first})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (a dict of parameter name -> tensor) of guided-diffusion's "
                         f"UNetModel, got {type(state).__name__}")
    check_adm_keys(state, str(path))
    return state


def check_adm_keys(state: dict[str, Tensor], name: str) -> None:
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.1.qkv.weight", "out.2.weight"):
        if key not in state:
            raise ValueError(f"{name}: not a guided-diffusion (ADM) UNetModel state dict: no {key!r} (its first "
                             f"keys: {', '.join(list(state)[:4])})")


def infer_architecture(state: dict[str, Tensor]) -> ADMConfig:
    """The architecture a guided-diffusion state dict determines (settings at their defaults); the whole state
    dict is then checked against it by :func:`mismatch`."""
    check_adm_keys(state, "state dict")
    outputs = sorted({int(k.split(".")[1]) for k in state if k.startswith("output_blocks.")})

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix + ".") for k in state)

    def is_attention(prefix: str) -> bool:
        return f"{prefix}.qkv.weight" in state

    # the last output block of every level but the first ends with an upsampler: its index is nrb
    nrb = next((i for i in outputs
                if has(f"output_blocks.{i}.{2 if is_attention(f'output_blocks.{i}.1') else 1}")), len(outputs) - 1)
    levels = len(outputs) // (nrb + 1)
    first = [1 + level * (nrb + 1) for level in range(levels)]  # first input block of each level
    conv2 = [state.get(f"input_blocks.{b}.0.out_layers.3.weight") for b in first]
    if nrb < 1 or any(w is None for w in conv2):
        raise ValueError("state dict: the guided-diffusion blocks do not form levels of res blocks (no "
                         f"'input_blocks.N.0.out_layers.3.weight' at the level starts {first})")
    in_ch, out_ch = state["input_blocks.0.0.weight"].shape[1], state["out.2.weight"].shape[0]
    c_out0 = int(conv2[0].shape[0])
    emb = state[f"input_blocks.{first[0]}.0.emb_layers.1.weight"].shape[0]
    label = state.get("label_emb.weight")
    return ADMConfig(
        in_channels=int(in_ch), out_channels=int(out_ch), model_channels=int(state["time_embed.0.weight"].shape[1]),
        level_channels=tuple(int(w.shape[0]) for w in conv2), num_res_blocks=nrb,
        attention_levels=tuple(level for level, b in enumerate(first) if is_attention(f"input_blocks.{b}.1")),
        use_scale_shift_norm=emb == 2 * c_out0,
        resblock_updown=levels > 1 and f"input_blocks.{first[0] + nrb}.0.in_layers.0.weight" in state,
        num_classes=None if label is None else int(label.shape[0]))


def resolve_config(state: dict[str, Tensor], preset: str | None = None, **settings) -> ADMConfig:
    """The :class:`ADMConfig` of a state dict: a preset's (checked against the state dict), else the
    architecture read from it with the settings given, the rest taken from the presets that fit it."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"unknown ADM setting(s) {unknown}; the settings a state dict does not fix are {list(SETTINGS)}")
    settings = {k: v for k, v in settings.items() if v is not None}
    _check_settings(settings)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        cfg = replace(config_from_flags(PRESETS[preset], state["input_blocks.0.0.weight"].shape[1]), **settings)
        problem = mismatch(cfg, state)
        if problem:
            raise ValueError(f"preset {preset!r} contradicts the state dict: {problem}")
        return cfg
    arch = infer_architecture(state)
    problem = mismatch(arch, state)
    fits = [name for name, flags in PRESETS.items()
            if config_from_flags(flags, arch.in_channels).architecture() == arch]
    if problem:
        closest = _closest_preset(state)
        raise ValueError(f"the state dict fits no guided-diffusion layout ({problem}); closest preset "
                         f"{closest[0]!r}: {closest[1]}")
    # heads are given either way: by width (num_heads then unused) or by count (guided-diffusion's default)
    if settings.get("num_head_channels", -1) != -1:
        settings.setdefault("num_heads", 1)
    elif "num_heads" in settings:
        settings.setdefault("num_head_channels", -1)
    missing = [k for k in SETTINGS if k not in settings]
    if missing:
        known = {name: config_from_flags(PRESETS[name], arch.in_channels) for name in fits}
        values = {k: {getattr(c, k) for c in known.values()} for k in missing}
        if not fits or any(len(v) > 1 for v in values.values()):
            why = ("no preset has this architecture" if not fits else
                   f"the presets that fit it ({', '.join(fits)}) differ in "
                   f"{', '.join(k for k, v in values.items() if len(v) > 1)}")
            closest = "" if fits else f" (closest preset {_closest_preset(state)[0]!r}: {_closest_preset(state)[1]})"
            raise ValueError(f"the state dict does not fix {', '.join(missing)} and {why}{closest}: give a preset "
                             f"({', '.join(sorted(PRESETS))}) or these settings")
        settings.update({k: v.pop() for k, v in values.items()})
    return replace(arch, **settings)


def _closest_preset(state) -> tuple[str, str]:
    """The preset whose layout matches the state dict longest, with its first mismatch."""
    in_ch = state["input_blocks.0.0.weight"].shape[1]
    best = None
    for name, flags in PRESETS.items():
        cfg = config_from_flags(flags, in_ch)
        agree = 0
        for key, _, shape in layout(cfg):
            if key not in state or tuple(state[key].shape) != shape:
                break
            agree += 1
        if best is None or agree > best[0]:
            best = (agree, name, mismatch(cfg, state))
    return best[1], best[2]


def _check_settings(settings: dict) -> None:
    for key in ("image_size", "num_heads"):
        if key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], int)
                                or settings[key] < 1):
            raise ValueError(f"{key}: expected a positive integer, got {settings[key]!r}")
    nhc = settings.get("num_head_channels")
    if nhc is not None and (isinstance(nhc, bool) or not isinstance(nhc, int) or not (nhc == -1 or nhc >= 1)):
        raise ValueError(f"num_head_channels: expected a positive integer or -1 (heads set by num_heads), got {nhc!r}")
    if "use_new_attention_order" in settings and not isinstance(settings["use_new_attention_order"], bool):
        raise ValueError(f"use_new_attention_order: expected True or False, got {settings['use_new_attention_order']!r}")
    if "noise_schedule" in settings and settings["noise_schedule"] not in _SCHEDULES:
        raise ValueError(f"noise_schedule: expected one of {list(_SCHEDULES)}, got {settings['noise_schedule']!r}")


# ---- conversion -------------------------------------------------------------------------------------------

def _head_dim(cfg: ADMConfig) -> int | None:
    """The one attention head width UNet2DModel takes (None: one head as wide as each layer); an error when the
    checkpoint's heads differ in width."""
    widths = {cfg.level_channels[level] for level in cfg.attention_levels} | {cfg.level_channels[-1]}
    if all(cfg.heads(c) == 1 for c in widths):
        return None
    dims = {}
    for c in sorted(widths):
        heads = cfg.heads(c)
        if c % heads:
            raise ValueError(f"attention of {c} channels cannot be split into {heads} heads")
        dims[c] = c // heads
    if len(set(dims.values())) > 1:
        per = ", ".join(f"{c} channels: {c // d} heads of {d}" for c, d in dims.items())
        raise ValueError(f"UNet2DModel has one attention head width for the whole network, this checkpoint's "
                         f"heads differ ({per}); such a checkpoint (heads given by count, num_head_channels=-1, "
                         "over levels of different widths) cannot be converted")
    return dims.popitem()[1]


def unet_config(cfg: ADMConfig) -> dict:
    """The diffusers ``UNet2DModel`` config of the network ``cfg`` describes."""
    if cfg.level_channels[0] != cfg.model_channels:
        raise ValueError(f"UNet2DModel's time embedding has the first level's width ({cfg.level_channels[0]}), this "
                         f"checkpoint's has {cfg.model_channels} (a first channel multiplier other than 1, as in "
                         "guided-diffusion's 512×512 model): it cannot be converted")
    if cfg.image_size is None:
        raise ValueError("image_size: not set (a state dict does not fix it: give a preset or image_size)")
    levels = len(cfg.level_channels)
    down = "ResnetDownsampleBlock2D" if cfg.resblock_updown else "DownBlock2D"
    up = "ResnetUpsampleBlock2D" if cfg.resblock_updown else "UpBlock2D"
    resample = "resnet" if cfg.resblock_updown else "conv"
    return dict(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=list(cfg.level_channels), layers_per_block=cfg.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if level in cfg.attention_levels else down for level in range(levels)],
        up_block_types=["AttnUpBlock2D" if level in cfg.attention_levels else up for level in reversed(range(levels))],
        mid_block_type="UNetMidBlock2D", attention_head_dim=_head_dim(cfg), norm_num_groups=_GROUPS,
        attn_norm_num_groups=_GROUPS, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
        time_embedding_type="positional", downsample_padding=1, downsample_type=resample, upsample_type=resample,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        num_class_embeds=cfg.num_classes)


def scheduler_config(cfg: ADMConfig) -> dict:
    """diffusers ``DDPMScheduler`` config of guided-diffusion's 1000-step schedule (learned σ: ``learned_range``,
    as guided-diffusion interpolates log-variances)."""
    return dict(num_train_timesteps=1000, beta_schedule=_SCHEDULES[cfg.noise_schedule], beta_start=0.0001,
                beta_end=0.02, prediction_type="epsilon", clip_sample=True,
                variance_type="learned_range" if cfg.learn_sigma else "fixed_small")


def _convert_qkv(weight: Tensor, heads: int, new_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Split guided-diffusion's fused q/k/v projection (rows, …) into diffusers' to_q, to_k, to_v, each with
    head h in rows h·d … (h+1)·d − 1. The new order (QKVAttention) splits q, k, v first, then heads; the legacy
    order (QKVAttentionLegacy) splits heads first, each head's rows being its q, k, v."""
    rows = weight.shape[0] // 3
    shaped = weight.reshape(3, heads, rows // heads, *weight.shape[1:]) if new_order else \
        weight.reshape(heads, 3, rows // heads, *weight.shape[1:]).transpose(0, 1)
    return tuple(part.reshape(rows, *weight.shape[1:]) for part in shaped)


def convert_state_dict(state: dict[str, Tensor], cfg: ADMConfig) -> dict[str, Tensor]:
    """The ``UNet2DModel`` state dict holding ``state``'s weights (``cfg`` must fit ``state``: see
    :func:`mismatch`)."""
    out = {}
    for adm_key, key, _ in layout(cfg):
        value = state[adm_key]
        if ".to_qkv." in key:  # attention channels = the q/k/v rows / 3
            heads = cfg.heads(value.shape[0] // 3)
            parts = _convert_qkv(value, heads, cfg.use_new_attention_order)
            for name, part in zip("qkv", parts):
                out[key.replace("to_qkv", f"to_{name}")] = part.squeeze(-1).contiguous()
        elif ".to_out." in key:  # guided-diffusion's 1-d convolution with kernel 1 is diffusers' linear
            out[key] = value.squeeze(-1).contiguous()
        else:
            out[key] = value.contiguous()
    return out


def convert_adm(state: dict[str, Tensor], preset: str | None = None, **settings):
    """A guided-diffusion state dict as ``(unet, scheduler, cfg)``: a diffusers ``UNet2DModel`` with its weights
    (in eval mode, no gradients), a ``DDPMScheduler`` of its noise schedule, and its :class:`ADMConfig`."""
    from diffusers import DDPMScheduler, UNet2DModel

    cfg = resolve_config(state, preset, **settings)
    config = unet_config(cfg)
    weights = convert_state_dict(state, cfg)
    unet = UNet2DModel(**config)
    # an unconditional class does not exist: every one of guided-diffusion's label embeddings is a real class
    unet.register_to_config(_diffsolve_has_null_class=False)
    unet.load_state_dict(weights, strict=True, assign=True)  # assign: the checkpoint's dtype, no copy
    return unet.eval().requires_grad_(False), DDPMScheduler(**scheduler_config(cfg)), cfg


def load_adm(path: str | Path, preset: str | None = None, *, prediction: str | None = None,
             device=None, dtype: torch.dtype | None = None, **settings):
    """A guided-diffusion checkpoint as a :class:`~diffsolve.DiffusionModel` (see :func:`convert_adm`)."""
    from .model import DiffusionModel
    from .schedules import DiscreteVP

    state = read_state_dict(path)
    if dtype is not None:  # cast before assigning: diffusers' .to(dtype) logs a float32-modules warning for any model
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    unet, scheduler, _ = convert_adm(state, preset, **settings)
    if device is not None:
        unet = unet.to(device=device)
    schedule = DiscreteVP.from_config(scheduler.config)
    return DiffusionModel(unet, schedule, prediction or "epsilon")


def convert_checkpoint(path: str | Path, out_dir: str | Path, preset: str | None = None, **settings) -> ADMConfig:
    """Write a guided-diffusion checkpoint as a diffusers pipeline folder (``model_index.json``, ``unet/``
    config + safetensors, ``scheduler/``) that :func:`diffsolve.load_model` and ``DDPMPipeline.from_pretrained``
    read. ``out_dir`` must not exist (or be empty); the folder appears whole or not at all."""
    from diffusers import DDPMPipeline

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"OUT_DIR: {out_dir} exists and is not an empty folder; diffsolve does not overwrite "
                              "it: choose a new folder")
    unet, scheduler, cfg = convert_adm(read_state_dict(path), preset, **settings)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out_dir)  # rename(2) onto a missing or empty folder: atomic
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg
