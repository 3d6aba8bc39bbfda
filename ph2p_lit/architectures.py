"""Stable Diffusion 1.5, 2.1 and SDXL as published (their components' configs), built with random
weights in the diffusers layout, so the real sizes run here without downloading anything.

Speed, memory and every shape and dtype path are those of the real models; only the pictures are
noise. `tiny_sdxl` is SDXL's architecture (two text encoders, pooled text embedding, size
conditioning) at toy size, for tests.

    python -c "from ph2p_lit.architectures import build_pipeline; build_pipeline('sdxl', 'models/sdxl-random')"
"""

import math
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .backbone import DEMO_MODEL

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1)

# Text encoders: CLIP ViT-L/14 (SD 1.x, SDXL's first), OpenCLIP ViT-H/14 (SD 2.x), OpenCLIP ViT-bigG/14 (SDXL's second).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)  # 24 layers, the last dropped: SD 2 reads the penultimate
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

SPECS = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),  # the rest: diffusers' defaults
        text_encoders=[CLIP_L], pads=["<|endoftext|>"], max_length=77,
        vae=dict(**SD_VAE, sample_size=512, scaling_factor=0.18215),
        prediction_type="epsilon",
    ),
    "sd21": dict(  # stable-diffusion-2-1, 768 px, v-prediction
        unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, upcast_attention=True),
        text_encoders=[OPENCLIP_H], pads=["!"], max_length=77,
        vae=dict(**SD_VAE, sample_size=768, scaling_factor=0.18215),
        prediction_type="v_prediction",
    ),
    "sdxl": dict(  # stable-diffusion-xl-base-1.0
        unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),  # 1280 pooled + 6 size numbers x 256
        text_encoders=[CLIP_L, OPENCLIP_BIGG], pads=["<|endoftext|>", "!"], max_length=77,
        vae=dict(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        prediction_type="epsilon",
    ),
    "tiny_sdxl": dict(  # SDXL's wiring at toy size, for tests
        unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                  attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=16 + 6 * 8),
        text_encoders=[dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            hidden_act="quick_gelu", projection_dim=32),
                       dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            hidden_act="gelu", projection_dim=16)],
        pads=["<|endoftext|>", "!"], max_length=16,
        vae=dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, sample_size=16,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 scaling_factor=0.13025, force_upcast=True),
        prediction_type="epsilon",
    ),
}


def build_components(name: str, seed: int = 0) -> dict:
    """The named architecture's components with random weights (float32), keyed as its pipeline's."""
    spec = SPECS[name]
    torch.manual_seed(seed)
    parts = {}
    for k, (text, pad) in enumerate(zip(spec["text_encoders"], spec["pads"])):
        suffix = "" if k == 0 else f"_{k + 1}"
        # CLIP's BPE vocabulary (the shipped tokenizer's), at the architecture's context length.
        tokenizer = CLIPTokenizer.from_pretrained(DEMO_MODEL, subfolder="tokenizer", model_max_length=spec["max_length"],
                                                  pad_token=pad)
        config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=spec["max_length"],
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **text)
        # SDXL's second encoder carries the projection that makes the pooled text embedding.
        encoder = CLIPTextModelWithProjection(config) if suffix == "_2" else CLIPTextModel(config)
        parts["tokenizer" + suffix], parts["text_encoder" + suffix] = tokenizer, encoder
    parts["unet"] = UNet2DConditionModel(**spec["unet"])
    parts["vae"] = AutoencoderKL(**spec["vae"])
    parts["scheduler"] = DDPMScheduler(**SCHEDULE, prediction_type=spec["prediction_type"])
    return parts


def build_pipeline(name: str, out_dir: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Build `name` with random weights and save it in the diffusers layout (model_index.json and
    one folder per component), as its pipeline class writes it; `from_pretrained` reads it back."""
    parts = build_components(name, seed)
    for key in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if key in parts:
            parts[key] = parts[key].to(dtype)
    if "text_encoder_2" in parts:
        pipeline = StableDiffusionXLPipeline(**parts)
    else:
        pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.save_pretrained(out_dir)
    return Path(out_dir)


def parameter_count(model_dir: str | Path) -> dict[str, int]:
    """Parameters per component of a saved pipeline folder, read from its safetensors headers."""
    counts = {}
    for file in sorted(Path(model_dir).glob("*/*.safetensors")):
        with safe_open(str(file), "pt") as f:
            n = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        counts[file.parent.name] = counts.get(file.parent.name, 0) + n
    return counts
