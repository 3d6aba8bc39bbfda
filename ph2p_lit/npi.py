"""Negative-prompt inversion (NPI): reconstruct and edit a real image from its prompt, no optimisation.

1. DDIM-invert the image latents with the prompt C (x_0 -> x_T).
2. Reverse DDIM with classifier-free guidance whose negative embedding is C itself:
   reconstruction uses condition C (and the U-Net runs once a step); an edit uses condition C'.
The baseline NPI improves on is the same with the empty prompt as the negative.
"""

import re

import torch

from .backbone import Backbone
from .errors import InputError
from .generate import denoise, strength_steps


@torch.no_grad()
def ddim_invert(
    backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, steps: int = 50, strength: float = 1.0
) -> torch.Tensor:
    """x_0 (B, C, h, w) -> x_T by deterministic DDIM steps conditioned on `cond` (no guidance).

    The inverse timesteps mirror `denoise`'s trailing schedule, so inverting and denoising with
    the same condition retrace one path (up to DDIM's first-order error). strength < 1 stops
    after the first round(steps * strength) steps: an edit then keeps more of the image's layout.
    """
    from diffusers import DDIMInverseScheduler  # loaded with the model, not at import: `--help` must not wait for it

    scheduler = DDIMInverseScheduler.from_config(backbone.scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps, device=backbone.device)
    x = latents.float()
    for t in scheduler.timesteps[: strength_steps(steps, strength)]:
        pred = backbone.predict(x, t, cond)
        x = scheduler.step(pred.float(), t, x).prev_sample
    return x


def reconstruct(
    backbone: Backbone,
    inverted: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor | None = None,
    negative: torch.Tensor | None = None,
    guidance: float = 7.5,
    steps: int = 50,
    strength: float = 1.0,
) -> torch.Tensor:
    """Latents from x_T: condition `target` (None: the source prompt, a reconstruction), negative
    `negative` (None: the source prompt, NPI; pass the empty prompt's embedding for the baseline)."""
    target = source if target is None else target
    negative = source if negative is None else negative
    return denoise(backbone, inverted, target, negative, guidance, steps, strength)


def apply_edit(prompt: str, edit: str) -> str:
    """An edit is a full prompt, or word substitutions "red->green, star->heart" applied at once
    (whole words, so red->green leaves "reddish" alone and a swap a->b, b->a works)."""
    if "->" not in edit:
        return edit
    pairs = {}
    for part in edit.split(","):
        if part.strip():
            old, sep, new = (s.strip() for s in part.partition("->"))
            if not sep or not old:
                raise InputError(f"model.edit={edit!r}: write substitutions as 'old->new, old2->new2'")
            pairs[old] = new
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in pairs) + r")\b")
    return pattern.sub(lambda m: pairs[m.group(1)], prompt)
