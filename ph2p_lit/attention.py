"""Token attention maps (the paper's Fig. 4): where in the image the U-Net looks for each prompt token.

The U-Net's cross-attention probabilities, averaged over heads, layers (each up-sampled to the
latent grid) and a set of timesteps in the window, at the image's noised latents. A recorder
processor replaces SDPA on the cross-attention layers only while maps are taken.
"""

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .backbone import Backbone


def sdpa_processor():
    """diffusers' attention through torch's SDPA (loaded with the model, not at import: `--help`
    must not wait for diffusers)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


class CrossAttentionProcessor:
    """Attention processor: self-attention through SDPA; cross-attention computed explicitly so
    that a subclass can read or change its probabilities in `on_probs`."""

    def __init__(self):
        self.sdpa = sdpa_processor()

    def on_probs(self, probs: torch.Tensor, batch: int) -> torch.Tensor:
        """probs (batch * heads, queries, tokens) -> the probabilities to use."""
        return probs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        plain = hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        if encoder_hidden_states is None or not plain:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        residual = hidden_states
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = self.on_probs(attn.get_attention_scores(query, key, None), hidden_states.shape[0])
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class CrossAttentionRecorder(CrossAttentionProcessor):
    """Keeps each cross-attention layer's probabilities, averaged over heads: (B, queries, tokens)."""

    def __init__(self):
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def on_probs(self, probs, batch):
        self.maps.append(probs.view(batch, -1, *probs.shape[1:]).mean(1).float())
        return probs


@contextmanager
def processing(backbone: Backbone, processor: CrossAttentionProcessor):
    """Use `processor` in the U-Net's attention layers for the block; SDPA again afterwards."""
    backbone.unet.set_attn_processor(processor)
    try:
        yield processor
    finally:
        backbone.unet.set_attn_processor(sdpa_processor())


def _on_grid(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """Layer maps (B, h*w, S) of several resolutions -> their mean on one size x size grid (B, S, size, size)."""
    total = 0
    for m in maps:
        side = int(round(m.shape[1] ** 0.5))
        grid = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], side, side)
        total = total + F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return total / len(maps)


@torch.no_grad()
def token_attention(
    backbone: Backbone,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    t_min: int = 500,
    t_max: int = 900,
    n_timesteps: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Cross-attention per token at the image resolution: (B, S, R, R), averaged over heads, layers
    and `n_timesteps` evenly spaced t in [t_min, t_max) (one seeded noise per t)."""
    g = torch.Generator().manual_seed(seed)
    size = backbone.latent_shape[-1]
    total = 0
    with processing(backbone, CrossAttentionRecorder()) as recorder:
        for t in torch.linspace(t_min, t_max - 1, n_timesteps).round().long():
            noise = torch.randn(latents.shape, generator=g).to(latents)
            ts = t.repeat(latents.shape[0]).to(backbone.device)
            backbone.predict(backbone.add_noise(latents, noise, ts), ts, hidden)
            total = total + _on_grid(recorder.maps, size)
            recorder.maps.clear()
    maps = total / n_timesteps
    return F.interpolate(maps, size=(backbone.resolution,) * 2, mode="bilinear", align_corners=False)


def prompt_tokens(backbone: Backbone, prompt: str) -> list[tuple[int, str]]:
    """(position, text) of the prompt's own tokens: BOS, EOS and padding left out."""
    ids = backbone.tokenize([prompt])[0].tolist()
    tok = backbone.tokenizer
    out = []
    for pos, i in enumerate(ids[1:], start=1):
        if i in (tok.eos_token_id, tok.pad_token_id):
            break
        out.append((pos, tok.decode([i]).strip()))
    return out


def normalise(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def heat_grid(image: np.ndarray, maps: np.ndarray, labels: list[str], tile: int = 128) -> Image.Image:
    """The image, then one tile per token: its map as a heat overlay, the token written below."""
    def up(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).resize((tile, tile), Image.Resampling.NEAREST)

    tiles = [up(image)]
    for m in maps:
        heat = normalise(m)[..., None]
        red = np.array([255.0, 40.0, 0.0])
        tiles.append(up(np.uint8(0.35 * image + 0.65 * (heat * red + (1 - heat) * np.array([20.0, 20.0, 60.0])))))
    grid = Image.new("RGB", (tile * len(tiles), tile + 18), "white")
    draw = ImageDraw.Draw(grid)
    for k, (t, label) in enumerate(zip(tiles, ["image", *labels])):
        grid.paste(t, (k * tile, 0))
        draw.text((k * tile + 4, tile + 3), label[:20], fill="black")
    return grid
