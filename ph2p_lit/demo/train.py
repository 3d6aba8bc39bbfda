"""Training of the demo model and its oracle on the procedural world, with Lightning.

Four stages, each bounded by a step count: the attribute oracle, the VAE, the text encoder and
U-Net jointly (caption dropout for classifier-free guidance, EMA weights shipped), then the VAE
decoder alone on the frozen encoder's latents.
"""

import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from .architecture import build_components, save_pipeline
from .oracle import AttributeOracle
from .tokenizer import build_clip_tokenizer
from .world import ATTRIBUTE_VALUES, make_renders


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _trainer(steps: int, name: str) -> L.Trainer:
    # Bounded by steps, not minutes, so that a seed reproduces the weights on any machine.
    return L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="auto",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger("build/demo_logs", name=name),
        enable_checkpointing=False,
        gradient_clip_val=1.0,
        log_every_n_steps=50,
        enable_model_summary=False,  # a table of layers between the command and its progress bars
    )


class OracleTraining(L.LightningModule):
    def __init__(self, lr: float = 2e-3):
        super().__init__()
        self.oracle, self.lr = AttributeOracle(), lr

    def training_step(self, batch, _):
        images, labels = batch
        logits = self.oracle(images)
        loss = sum(F.cross_entropy(logits[name], labels[:, i]) for i, name in enumerate(logits))
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class VAETraining(L.LightningModule):
    def __init__(self, vae, lr: float = 2e-3, kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.lr, self.kl_weight = vae, lr, kl_weight

    def training_step(self, batch, _):
        (images,) = batch
        posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, images)
        self.log("mse", mse, prog_bar=True)
        return mse + self.kl_weight * posterior.kl().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class DecoderTraining(L.LightningModule):
    """Sharpen the VAE decoder on frozen encoder latents: the latent space the U-Net learned is
    unchanged (Stable Diffusion's ft-MSE decoder is made the same way)."""

    def __init__(self, vae, lr: float = 5e-4):
        super().__init__()
        self.vae, self.lr = vae, lr
        self.vae.encoder.requires_grad_(False)
        self.vae.quant_conv.requires_grad_(False)

    def training_step(self, batch, _):
        latents, images = batch
        recon = self.vae.decode(latents).sample
        mse = F.mse_loss(recon, images)
        self.log("mse", mse, prog_bar=True)
        return mse + F.l1_loss(recon, images)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.vae.parameters() if p.requires_grad], lr=self.lr)


class DiffusionTraining(L.LightningModule):
    """Epsilon-prediction training of text encoder + U-Net on cached VAE latent distributions."""

    def __init__(self, text_encoder, unet, scheduler, lr: float = 5e-4, ema_decay: float = 0.999,
                 noise_offset: float = 0.05):
        super().__init__()
        self.text_encoder, self.unet, self.scheduler = text_encoder, unet, scheduler
        self.lr, self.noise_offset = lr, noise_offset
        avg = get_ema_multi_avg_fn(ema_decay)
        self.ema_unet = AveragedModel(unet, multi_avg_fn=avg, use_buffers=True)
        self.ema_text = AveragedModel(text_encoder, multi_avg_fn=avg, use_buffers=True)
        self.ema_unet.requires_grad_(False)
        self.ema_text.requires_grad_(False)

    def training_step(self, batch, _):
        mean, std, input_ids = batch
        latents = mean + std * torch.randn_like(std)
        # A small per-channel offset teaches the model to move the image mean, which SD's schedule
        # (non-zero terminal SNR) otherwise leaves to chance: here it decides the background colour.
        noise = torch.randn_like(latents)
        noise = noise + self.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        hidden = self.text_encoder(input_ids).last_hidden_state
        loss = F.mse_loss(self.unet(noisy, t, hidden).sample, noise)
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, *_):
        self.ema_unet.update_parameters(self.unet)
        self.ema_text.update_parameters(self.text_encoder)

    def configure_optimizers(self):
        # No weight decay: tokens the world never uses must keep their initial embeddings.
        opt = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()), lr=self.lr, weight_decay=0.0
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 200))
        return [opt], [{"scheduler": warmup, "interval": "step"}]


def _attribute_labels(scenes) -> torch.Tensor:
    return torch.tensor(
        [[ATTRIBUTE_VALUES[name].index(getattr(s, name)) for name in ATTRIBUTE_VALUES] for s in scenes]
    )


def train_oracle(steps: int, n_train: int, seed: int) -> tuple[AttributeOracle, dict]:
    images, scenes = make_renders(n_train, seed + 1)
    data = TensorDataset(to_tensor(images), _attribute_labels(scenes))
    module = OracleTraining()
    _trainer(steps, "oracle").fit(module, DataLoader(data, batch_size=256, shuffle=True))
    oracle = module.oracle.eval()
    test_images, test_scenes = make_renders(2000, seed + 2)  # fresh renders, never seen in training
    reads = oracle.read(to_tensor(test_images))
    accuracy = {
        name: float(np.mean([r[name] == getattr(s, name) for r, s in zip(reads, test_scenes)]))
        for name in ATTRIBUTE_VALUES
    }
    return oracle, accuracy


def train_demo(
    out_dir: str = "runs/demo_model",
    seed: int = 0,
    n_train: int = 40000,
    oracle_steps: int = 600,
    vae_steps: int = 700,
    diffusion_steps: int = 3600,
    decoder_steps: int = 1500,
    caption_dropout: float = 0.1,
    save_dtype: str = "float16",
) -> dict:
    """Train the demo model (oracle, VAE, then text encoder + U-Net) on the procedural world.

    Defaults take about 45 minutes on 2 CPU cores (docs/results.md has the measured time).

    Args:
        out_dir: where the pipeline is written (the shipped model is ph2p_lit/demo/model: name it
            to replace it); the oracle goes beside it.
        seed: seeds the renders, the initial weights and the training order.
        n_train: procedural renders to train on.
        oracle_steps: optimiser steps of the attribute oracle (a CNN).
        vae_steps: optimiser steps of the VAE.
        diffusion_steps: optimiser steps of text encoder + U-Net (EMA weights are saved).
        decoder_steps: optimiser steps of the VAE decoder's fine-tuning on the final latents.
        caption_dropout: share of captions replaced by "" (for classifier-free guidance).
        save_dtype: dtype the weights are stored in (they load as float32).
    """
    L.seed_everything(seed)
    torch.set_float32_matmul_precision("high")
    start = time.time()
    report = {"seed": seed, "n_train": n_train}

    oracle, report["oracle_accuracy"] = train_oracle(oracle_steps, n_train, seed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    oracle.save(Path(out_dir).parent / "oracle.safetensors")
    print("oracle accuracy on fresh renders:", report["oracle_accuracy"])

    tokenizer = build_clip_tokenizer(Path("build") / "tokenizer", model_max_length=16)
    parts = build_components(tokenizer, seed=seed)
    images, scenes = make_renders(n_train, seed)
    pixels = to_tensor(images)

    vae_module = VAETraining(parts["vae"])
    _trainer(vae_steps, "vae").fit(vae_module, DataLoader(TensorDataset(pixels), batch_size=32, shuffle=True))
    vae = parts["vae"].eval().requires_grad_(False)
    with torch.no_grad():
        dists = [vae.encode(chunk).latent_dist for chunk in pixels.split(1000)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
        recon = vae.decode(mean[:1000]).sample
    report["vae_mse"] = float(F.mse_loss(recon, pixels[:1000]))
    # SD's convention: latents * scaling_factor have unit variance (0.18215 for SD 1.x's VAE).
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    report["scaling_factor"] = scaling
    print(f"vae mse {report['vae_mse']:.4f}, scaling factor {scaling:.4f}")

    rng = np.random.default_rng(seed)
    captions = [s.caption if rng.random() >= caption_dropout else "" for s in scenes]
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    data = TensorDataset(mean * scaling, std * scaling, ids)
    module = DiffusionTraining(parts["text_encoder"], parts["unet"], parts["scheduler"])
    trainer = _trainer(diffusion_steps, "diffusion")
    trainer.fit(module, DataLoader(data, batch_size=128, shuffle=True, drop_last=True))
    report["diffusion_steps"] = trainer.global_step

    parts["unet"].load_state_dict(module.ema_unet.module.state_dict())
    parts["text_encoder"].load_state_dict(module.ema_text.module.state_dict())
    save_pipeline(parts, out_dir, dtype=getattr(torch, save_dtype))
    report.update(finetune_decoder(out_dir, decoder_steps, n_train // 4, seed, save_dtype))
    report["minutes"] = (time.time() - start) / 60
    Path(out_dir, "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


def finetune_decoder(out_dir: str, steps: int, n: int, seed: int, save_dtype: str = "float16") -> dict:
    """Last stage: fine-tune the saved VAE's decoder on fresh renders; rewrite vae/ in place."""
    from diffusers import AutoencoderKL

    L.seed_everything(seed + 3)
    vae = AutoencoderKL.from_pretrained(out_dir, subfolder="vae", torch_dtype=torch.float32)
    images, _ = make_renders(n, seed + 3)
    pixels = to_tensor(images)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(1000)])
        before = float(F.mse_loss(vae.decode(latents[:1000]).sample, pixels[:1000]))
    vae.train()
    _trainer(steps, "decoder").fit(
        DecoderTraining(vae), DataLoader(TensorDataset(latents, pixels), batch_size=32, shuffle=True)
    )
    vae.eval()
    test_images, _ = make_renders(1000, seed + 4)
    test = to_tensor(test_images)
    with torch.no_grad():
        after = float(F.mse_loss(vae.decode(vae.encode(test).latent_dist.mean).sample, test))
    vae.to(getattr(torch, save_dtype)).save_pretrained(Path(out_dir) / "vae", safe_serialization=True)
    return {"decoder_mse_before": before, "decoder_mse_after_fresh_renders": after, "decoder_steps": steps}
