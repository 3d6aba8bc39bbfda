"""The demo model's components: Stable Diffusion's own classes at toy size.

`build_components` is used by the demo training and by the tests' tiny random model, so both go
through the same classes and the same `save_pipeline` layout that `from_pretrained` reads.
"""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Stable Diffusion 1.x's noise schedule.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_components(
    tokenizer: CLIPTokenizer,
    text_hidden: int = 64,
    text_layers: int = 2,
    unet_channels: tuple[int, ...] = (64, 128),
    vae_channels: tuple[int, ...] = (32, 64, 64),
    latent_channels: int = 4,
    image_size: int = 32,
    seed: int = 0,
) -> dict:
    """Randomly initialised text encoder, U-Net, VAE and scheduler of the given sizes."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=max(1, text_hidden // 32),
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, vae_channels[0]),
        sample_size=image_size,
    )
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(unet_channels),
        block_out_channels=unet_channels,
        layers_per_block=1,
        cross_attention_dim=text_hidden,
        attention_head_dim=max(1, unet_channels[0] // 32),
        norm_num_groups=min(32, unet_channels[0]),
    )
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=DDPMScheduler(**SD_SCHEDULE),
    )


def save_pipeline(components: dict, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save in the diffusers pipeline layout (model_index.json + one folder a component), as
    StableDiffusionPipeline writes it. Weights are stored in `dtype` (small), but every config says
    float32, so the obvious `StableDiffusionPipeline.from_pretrained(folder)` loads all parts in
    one dtype (transformers would otherwise load the text encoder in its stored dtype and diffusers
    the U-Net in float32, and generating fails on the mismatch)."""
    out_dir = Path(out_dir)
    parts = {k: v.to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out_dir)
    for k, v in components.items():
        if isinstance(v, torch.nn.Module):
            v.to(torch.float32)
    config = out_dir / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "float32"}, indent=2) + "\n")
    return out_dir
