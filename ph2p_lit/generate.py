"""Images from prompts: DDIM sampling with classifier-free guidance on the frozen backbone.

Used to regenerate images from recovered prompts (quality measurement, reports).
"""

import torch
from diffusers import DDIMScheduler

from .backbone import Backbone


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[str],
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    negative_prompt: str = "",
) -> torch.Tensor:
    """One image per prompt, in [-1, 1]: (B, 3, H, W). Seeded per call, so reproducible."""
    # "trailing" spacing starts at t = T - 1, where the model last saw almost pure noise.
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps, device=backbone.device)
    cond = backbone.encode_text(prompts)
    uncond = backbone.encode_text([negative_prompt] * len(prompts))
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(prompts), *backbone.latent_shape), generator=g).to(backbone.device, backbone.dtype)
    for t in scheduler.timesteps:
        both = backbone.unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).sample
        pred_uncond, pred_cond = both.chunk(2)
        pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return backbone.decode_latents(latents)
