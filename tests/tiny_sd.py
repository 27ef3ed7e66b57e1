"""A tiny Stable-Diffusion-style pipeline with random weights, built from configs without network access.

Modelled on diffusers' own ``StableDiffusionPipelineFastTests.get_dummy_components``; their tokenizer is
downloaded ('hf-internal-testing/tiny-random-clip'), so here a byte-level CLIP BPE tokenizer is written
locally: a vocabulary of the 256 byte symbols (with and without the end-of-word mark) and no merges, so
every string tokenizes (one token per byte).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LATENT = 8  # latent side; images are 16 × 16 (two VAE blocks: scale factor 2)
MAX_TOKENS = 16


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)


def make_tiny_sd(tmp: Path, scheduler=None, seed: int = 0):
    """A StableDiffusionPipeline of random tiny parts (UNet2DConditionModel on 4 × 8 × 8 latents, AutoencoderKL,
    CLIP text encoder, the local tokenizer)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=LATENT, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=514, max_position_embeddings=MAX_TOKENS,
    ))
    tokenizer = make_tokenizer(tmp / "tokenizer_src")
    scheduler = scheduler or DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012, algorithm_type="dpmsolver++", steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
