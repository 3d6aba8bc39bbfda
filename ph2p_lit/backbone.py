"""The frozen latent diffusion model: loading, image and prompt encoding, the diffusion loss.

Shared and read-only: it is never a parameter of a LightningModule and never in a checkpoint.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.masking_utils import create_causal_mask

from .errors import InputError

DEMO_MODEL = str(Path(__file__).parent / "demo" / "model")


def resolve_model(model: str) -> str:
    """`demo` names the model shipped with the package; a path must be a diffusers pipeline folder;
    anything else is a hub id."""
    path = DEMO_MODEL if model == "demo" else model
    looks_like_path = Path(path).is_absolute() or path.startswith(".") or Path(path).exists()
    if looks_like_path and not (Path(path) / "unet").is_dir():
        raise InputError(
            f"model {model!r}: no diffusers pipeline folder at {path} "
            "(expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    return path


@dataclass
class Backbone:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler

    @classmethod
    def from_pretrained(
        cls,
        model: str = "demo",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
    ) -> "Backbone":
        """Load a diffusers-layout Stable Diffusion checkpoint (folder or hub id), frozen."""
        path = resolve_model(model)
        kw = dict(local_files_only=local_files_only)

        def load(part: str, loader):
            try:
                return loader(path, subfolder=part, **kw)
            except Exception as e:  # missing or corrupt file, unknown hub id, no network: many types, many lines
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise InputError(
                    f"model {model!r}: cannot load its {part}/ ({reason}). Give a diffusers pipeline folder, or a "
                    "hub id that is in the local cache (local_files_only=true) or reachable online"
                ) from None

        backbone = cls(
            tokenizer=load("tokenizer", CLIPTokenizer.from_pretrained),
            text_encoder=load("text_encoder", lambda *a, **k: CLIPTextModel.from_pretrained(*a, dtype=dtype, **k)),
            unet=load("unet", lambda *a, **k: UNet2DConditionModel.from_pretrained(*a, torch_dtype=dtype, **k)),
            vae=load("vae", lambda *a, **k: AutoencoderKL.from_pretrained(*a, torch_dtype=dtype, **k)),
            scheduler=load("scheduler", DDPMScheduler.from_pretrained),
        )
        return backbone.to(device)

    def to(self, device: str | torch.device) -> "Backbone":
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device).eval().requires_grad_(False)
            if hasattr(module, "set_attn_processor"):
                from diffusers.models.attention_processor import AttnProcessor2_0

                module.set_attn_processor(AttnProcessor2_0())  # SDPA
        self._alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        return self

    # ---- shapes the rest of the package reads instead of hard-coding SD's numbers ----
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def max_length(self) -> int:
        """Tokens the text encoder sees, BOS and EOS included (77 for SD, 16 for the demo)."""
        return self.tokenizer.model_max_length

    @property
    def resolution(self) -> int:
        return self.vae.config.sample_size

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, size, size)

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        return self._text_transformer.embeddings.token_embedding

    # ---- encoders ----
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, h, w) (posterior mean)."""
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        images = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor + shift).sample
        return images.float().clamp(-1, 1)

    @property
    def _text_transformer(self):
        # transformers 5 folds the text transformer into CLIPTextModel; 4.x keeps it in .text_model
        return getattr(self.text_encoder, "text_model", self.text_encoder)

    def encode_embeddings(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, S, D) -> text-encoder hidden states (B, S, D), differentiably.

        CLIPTextModel.forward takes only input_ids; this is the same computation (position
        embeddings, causal self-attention, final layer norm) starting from embeddings.
        """
        text = self._text_transformer
        hidden = text.embeddings(inputs_embeds=token_embeds.to(self.text_encoder.dtype))
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return text.final_layer_norm(hidden)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> hidden states (B, S, D) through the ordinary input_ids path."""
        ids = self.tokenize(prompts)
        return self.text_encoder(ids).last_hidden_state

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids.to(self.device)

    # ---- diffusion ----
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
        a = self._alphas_cumprod[t].view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the U-Net predicts: eps (SD 1.x) or v (SD 2.x), read from the scheduler."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            a = self._alphas_cumprod[t].view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
            return a.sqrt() * noise - (1 - a).sqrt() * latents
        raise InputError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")

    def diffusion_loss(
        self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample ||target - unet(x_t, t, c)||^2, averaged over latent elements: (N,).

        latents, noise: (N, C, h, w); t: (N,); hidden: (N, S, D).
        """
        noisy = self.add_noise(latents, noise, t)
        pred = self.unet(noisy.to(self.dtype), t, hidden.to(self.dtype)).sample
        return (pred.float() - self.target(latents, noise, t).float()).pow(2).flatten(1).mean(1)
