"""The frozen latent diffusion model: loading, image and prompt encoding, the diffusion loss.

Shared and read-only: it is never a parameter of a LightningModule and never in a checkpoint.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from .errors import InputError

if TYPE_CHECKING:  # the libraries load with the model (from_pretrained), not with this module: see __init__.py
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def _on_this_machine(name: str) -> bool:
    """A folder, the demo, or a hub id with a snapshot in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    if name == "demo" or Path(name).exists():
        return True
    try:
        snapshot_download(name, local_files_only=True)
        return True
    except Exception:  # not in the cache, or not a valid hub id: either way nothing to load here
        return False


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot supply weights now, or None if it can: offline by setting, or
    no answer within 3 s (rather than the hub client's ~25 s of retries for every file)."""
    from huggingface_hub import constants

    flag = next((f for f in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE")), None)
    if flag or constants.HF_HUB_OFFLINE:
        return f"{flag or 'HF_HUB_OFFLINE'} is set"
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        return None
    except OSError:
        return f"{endpoint.hostname} does not answer"


def check_weights_here(models: dict[str, str | None], local_files_only: bool, missing: list[str] = ()) -> None:
    """Before a command loads anything: one line naming every weight it needs that is neither on
    this machine nor fetchable now, instead of one error per part, each after the hub's retries.

    models: setting -> folder or hub id (None: not used); `missing`: other weights already known
    to be absent, each described with what to do (LPIPS's, from torch's cache).
    """
    absent = [(key, name) for key, name in models.items() if name and not _on_this_machine(name)]
    why = ("local_files_only is set" if local_files_only else hub_unreachable()) if absent else None
    if why is None:
        absent = []  # the hub supplies them on first use
    if not absent and not missing:
        return
    named = []
    if absent:
        keys = ", ".join(f"{key}={name!r}" for key, name in absent)
        fetch = ", ".join(f"hf download {name}" for name in dict.fromkeys(name for _, name in absent))
        named = [f"{keys}: not on this machine (not in the Hugging Face cache, and {why}); fetch once ({fetch}) "
                 "or give a local folder"]
    raise InputError("; ".join(named + list(missing)))


@dataclass
class Backbone:
    """SD 1.x / 2.x (one CLIP text encoder) or SDXL (two, and a pooled text embedding).

    SDXL's two encoders read one token sequence (their tokenizers share CLIP's vocabulary), so a
    token's embedding here is its two rows side by side: `token_table` is (V, D1 + D2), a soft
    prompt lives in that joint space, and its projection onto the vocabulary sums the two
    squared distances (docs/ARCHITECTURE.md#sdxl-one-prompt-two-text-encoders).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    offload: bool = False  # VAE and text encoders wait on the CPU, on the device only while used

    @classmethod
    def from_pretrained(
        cls,
        model: str = "demo",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
        offload: bool = False,
        gradient_checkpointing: bool = False,
    ) -> Backbone:
        """Load a diffusers-layout Stable Diffusion or SDXL checkpoint (folder or hub id), frozen.

        offload: keep the VAE and text encoders on the CPU between uses (less device memory).
        gradient_checkpointing: recompute the U-Net's activations in the backward pass to the
            prompt instead of storing them (less memory, about one more forward's time).
        """
        from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = resolve_model(model)
        check_weights_here({"model": model}, local_files_only)
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

        try:
            parts = DiffusionPipeline.load_config(path, **kw)
        except Exception:  # an older folder without model_index.json: SD's five parts
            parts = {}
        two_encoders = "text_encoder_2" in parts
        vae = load("vae", lambda *a, **k: AutoencoderKL.from_pretrained(*a, torch_dtype=dtype, **k))
        if dtype == torch.float16 and vae.config.get("force_upcast"):
            vae = vae.float()  # SDXL's VAE overflows in float16 (its config says so)
        backbone = cls(
            tokenizer=load("tokenizer", CLIPTokenizer.from_pretrained),
            text_encoder=load("text_encoder", lambda *a, **k: CLIPTextModel.from_pretrained(*a, dtype=dtype, **k)),
            unet=load("unet", lambda *a, **k: UNet2DConditionModel.from_pretrained(*a, torch_dtype=dtype, **k)),
            vae=vae,
            scheduler=load("scheduler", DDPMScheduler.from_pretrained),
            tokenizer_2=load("tokenizer_2", CLIPTokenizer.from_pretrained) if two_encoders else None,
            text_encoder_2=load("text_encoder_2", lambda *a, **k: CLIPTextModelWithProjection.from_pretrained(
                *a, dtype=dtype, **k)) if two_encoders else None,
            offload=offload,
        )
        if two_encoders and len(backbone.tokenizer) != len(backbone.tokenizer_2):
            raise InputError(f"model {model!r}: tokenizer/ and tokenizer_2/ have different vocabularies "
                             f"({len(backbone.tokenizer)} vs {len(backbone.tokenizer_2)}); one prompt cannot be read by both")
        if gradient_checkpointing:
            backbone.unet.enable_gradient_checkpointing()
        return backbone.to(device)

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def to(self, device: str | torch.device) -> Backbone:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.compute_device = torch.device(device)
        for module in (*self.text_encoders, self.unet, self.vae):
            module.eval().requires_grad_(False)
            module.to("cpu" if self.offload and module is not self.unet else device)
        for module in (self.unet, self.vae):
            module.set_attn_processor(AttnProcessor2_0())  # SDPA
        tables = [e.get_input_embeddings().weight.detach() for e in self.text_encoders]
        self.token_table = torch.cat([t.to(device, torch.float32) for t in tables], dim=1)  # (V, D1 [+ D2])
        self._widths = [t.shape[1] for t in tables]
        return self

    @contextmanager
    def using(self, *modules):
        """With offload, these modules come to the device for the block and go back after."""
        if self.offload:
            for module in modules:
                module.to(self.compute_device)
        try:
            yield
        finally:
            if self.offload:
                for module in modules:
                    module.to("cpu")

    # ---- shapes the rest of the package reads instead of hard-coding SD's numbers ----
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

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
        return self.latent_shape_at(self.resolution)

    def latent_shape_at(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, size, size)

    # ---- prompts as token embeddings ----
    def prompt_embeds(self, rows: list[list[int]]) -> torch.Tensor:
        """Token-id prompts (each at most max_length - 2 long) -> text-encoder input (N, S, D):
        [BOS] tokens [EOS] [pad ...], EOS right after the last token (as the tokenizer writes it),
        each encoder's own pad token in its part of D."""
        tok, S = self.tokenizer, self.max_length
        ids = torch.tensor([[tok.bos_token_id, *row, tok.eos_token_id] + [tok.pad_token_id] * (S - 2 - len(row))
                            for row in rows], device=self.token_table.device)
        embeds = self.token_table[ids]
        for (lo, hi), tokenizer in zip(self._parts(), (self.tokenizer, self.tokenizer_2)):
            if tokenizer is not None and tokenizer.pad_token_id != tok.pad_token_id:
                pads = torch.arange(S, device=ids.device)[None] > torch.tensor([len(r) + 1 for r in rows], device=ids.device)[:, None]
                embeds[..., lo:hi][pads] = self.token_table[tokenizer.pad_token_id, lo:hi]
        return embeds

    def _parts(self) -> list[tuple[int, int]]:
        """Each text encoder's slice of the joint embedding width."""
        edges = [0, *torch.tensor(self._widths).cumsum(0).tolist()]
        return list(zip(edges[:-1], edges[1:]))

    def per_encoder(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """A joint token embedding (..., D1 [+ D2]) as each text encoder's own part."""
        return [embeds[..., lo:hi] for lo, hi in self._parts()]

    # ---- encoders ----
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, h, w) (posterior mean)."""
        with self.using(self.vae):
            latents = self.vae.encode(pixels.to(self.compute_device, self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        with self.using(self.vae):
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift).sample
        return images.float().clamp(-1, 1)

    def encode_embeddings(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, S, D) -> the U-Net's text conditioning, differentiably.

        SD: the text encoder's final hidden states (B, S, D). SDXL: both encoders' penultimate
        hidden states side by side, and the second encoder's pooled, projected EOS state as one
        more row (B, S + 1, D'), so every tensor operation on conditionings (cat, repeat,
        index) keeps the two together; `predict` takes them apart.
        """
        with self.using(*self.text_encoders):
            if not self.is_sdxl:
                return _run_text(self.text_encoder, token_embeds)[1]
            (lo1, hi1), (lo2, hi2) = self._parts()
            hidden_1 = _run_text(self.text_encoder, token_embeds[..., lo1:hi1])[0]
            hidden_2, final_2 = _run_text(self.text_encoder_2, token_embeds[..., lo2:hi2])
            # The pooled state is read at the first EOS, as CLIPTextModel does from input_ids.
            eos = (token_embeds[..., lo2:hi2] == self.token_table[self.tokenizer.eos_token_id, lo2:hi2]).all(-1)
            pooled = self.text_encoder_2.text_projection(final_2[torch.arange(len(final_2)), eos.int().argmax(1)])
            hidden = torch.cat([hidden_1, hidden_2], dim=-1)
            row = torch.zeros(len(hidden), 1, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
            row[:, 0, : pooled.shape[-1]] = pooled
            return torch.cat([hidden, row], dim=1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the U-Net's text conditioning (as encode_embeddings)."""
        if not self.is_sdxl:
            with self.using(self.text_encoder):
                return self.text_encoder(self.tokenize(prompts).to(self.compute_device)).last_hidden_state
        rows = self.tokenizer(prompts, add_special_tokens=False, truncation=True, max_length=self.max_length - 2).input_ids
        return self.encode_embeddings(self.prompt_embeds(rows))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).input_ids.to(self.device)

    # ---- diffusion ----
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the U-Net predicts: eps (SD 1.x, SDXL) or v (SD 2.x 768), read from the scheduler."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        raise InputError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The U-Net's prediction for noisy latents (N, C, h, w) at t with a conditioning from
        encode_embeddings / encode_text; SDXL's pooled row and size conditioning go where its
        U-Net expects them."""
        extra = None
        if self.is_sdxl:
            pooled_width = self.text_encoder_2.config.projection_dim
            cond, pooled = cond[:, :-1], cond[:, -1, :pooled_width]
            size = self.resolution  # original size, crop (0, 0), target size: the image as the model sees it
            time_ids = torch.tensor([size, size, 0, 0, size, size], device=self.device, dtype=self.dtype)
            extra = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.expand(len(noisy), -1)}
        return self.unet(noisy.to(self.dtype), t, cond.to(self.dtype), added_cond_kwargs=extra).sample

    def diffusion_loss(
        self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample ||target - unet(x_t, t, c)||^2, averaged over latent elements: (N,).

        latents, noise: (N, C, h, w); t: (N,); hidden: (N, S, D), from encode_embeddings.
        """
        latents, noise = latents.float(), noise.float()
        pred = self.predict(self.add_noise(latents, noise, t), t, hidden)
        return (pred.float() - self.target(latents, noise, t)).pow(2).flatten(1).mean(1)


def _run_text(encoder, token_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP text encoder from token embeddings (its forward takes only input_ids): position
    embeddings, causal self-attention. Returns the penultimate layer's hidden states (SDXL reads
    them) and the final ones after the last layer norm (SD reads them)."""
    from transformers.masking_utils import create_causal_mask  # loaded by from_pretrained already

    text = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection wraps a CLIPTextModel
    hidden = text.embeddings(inputs_embeds=token_embeds.to(encoder.dtype))
    mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
    *first, last = text.encoder.layers
    for layer in first:
        hidden = layer(hidden, mask, is_causal=True)
    return hidden, text.final_layer_norm(last(hidden, mask, is_causal=True))
