"""Step time, images per hour and peak memory of PH2P at Stable Diffusion 1.5's size, on a GPU.

python benchmarks/gpu.py [--batches 1 2 4 8 16] [--dtypes float32 bfloat16] [--size sd15]

The U-Net and text encoder have SD 1.5's architecture (860M + 123M parameters) with random
weights, so nothing is downloaded; speed and memory do not depend on the weights. One closure
evaluation is what a PH2P step repeats `max_iter` times: the text encoder from the prompt
embeddings, the U-Net at 64x64 latents, and the backward pass to the embeddings. A step is
max_iter evaluations; images per hour assume `--steps` steps per image (the authors' 500 x 20).
`--size tiny --device cpu` runs the same code on a toy model (the test suite does, so it never rots).
"""

import argparse
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ph2p_lit.backbone import DEMO_MODEL, Backbone
from ph2p_lit.demo.architecture import SD_SCHEDULE

SIZES = {
    # SD 1.5: UNet2DConditionModel's defaults are SD 1.x's except the text width and head size.
    "sd15": dict(unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 max_length=77),
    "tiny": dict(unet=dict(sample_size=8, cross_attention_dim=32, attention_head_dim=1, block_out_channels=(32, 32),
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                           norm_num_groups=32),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1),
                 max_length=16),
}


# SD 1.5's U-Net forward at 64x64 latents is ~0.80 TFLOP; forward and backward to the text
# embeddings (activation gradients only, no weight gradients) ~1.67 TFLOP per sample.
FLOPS_PER_EVALUATION = {"sd15": 1.67e12}


def build(size: str, dtype: torch.dtype, device: str) -> Backbone:
    spec = SIZES[size]
    tokenizer = CLIPTokenizer.from_pretrained(DEMO_MODEL, subfolder="tokenizer", model_max_length=spec["max_length"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=spec["max_length"],
                                        **spec["text"]))
    unet = UNet2DConditionModel(**spec["unet"])
    # The VAE only fixes the latent shape here (8x down-sampling); it is never run.
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=spec["unet"]["sample_size"] * 8)
    backbone = Backbone(tokenizer, text.to(dtype), unet.to(dtype), vae.to(dtype), DDPMScheduler(**SD_SCHEDULE))
    return backbone.to(device)


def evaluation(backbone: Backbone, prompt: torch.Tensor, latents: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor) -> None:
    """One PH2P closure evaluation: loss at the prompt, gradient back to the prompt embeddings."""
    prompt.grad = None
    hidden = backbone.encode_embeddings(prompt)
    backbone.diffusion_loss(latents, noise, t, hidden).sum().backward()


def measure(backbone: Backbone, batch: int, repeats: int) -> tuple[float, float]:
    """Seconds per evaluation (median of `repeats` after 2 warm-ups) and peak memory in GiB."""
    device = backbone.device
    D = backbone.token_table.shape[1]
    prompt = torch.randn(batch, backbone.max_length, D, device=device, requires_grad=True)
    latents = torch.randn(batch, *backbone.latent_shape, device=device)
    noise = torch.randn_like(latents)
    t = torch.randint(500, 900, (batch,), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        evaluation(backbone, prompt, latents, t, noise)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="sd15")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=int, default=1300,
                   help="U-Net evaluations per image at the demo-quality budget (docs/results.md: ~1,276)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the accelerator's dense peak (H100 SXM bf16: 989)")
    args = p.parse_args()
    diffusers_logging.set_verbosity_error()  # casting random weights to bf16 is intended here
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; bf16 is its own row
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"model: {args.size}; the authors' recipe: {args.steps} steps x {args.max_iter} evaluations per image; "
          f"demo-quality budget: {args.budget} evaluations per image\n")
    print("| dtype | batch | s / evaluation | s / image, authors | images / hour, authors | s / image, budget "
          "| peak memory GiB | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        backbone = build(args.size, getattr(torch, name), args.device)
        for batch in args.batches:
            try:
                seconds, peak = measure(backbone, batch, args.repeats)
            except torch.OutOfMemoryError:
                print(f"| {name} | {batch} | out of memory | | | |")
                break
            per_image = seconds * args.max_iter * args.steps / batch  # one evaluation serves the whole batch
            per_image_budget = seconds * args.budget / batch
            flops = FLOPS_PER_EVALUATION.get(args.size)
            share = f"{100 * flops * batch / seconds / (args.peak_tflops * 1e12):.1f}" if flops else "-"
            print(f"| {name} | {batch} | {seconds:.4f} | {per_image:.1f} | {3600 / per_image:.1f} | "
                  f"{per_image_budget:.1f} | {peak:.2f} | {share} |", flush=True)
        del backbone


if __name__ == "__main__":
    main()
