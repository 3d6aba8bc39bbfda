"""Quality measures on the demo world, where every image's ground truth is known.

- prompt scores: is the true colour/shape/background word in the prompt, and is it the only
  value of its attribute there ("exact": a prompt listing every colour gets no credit);
- oracle agreement: the oracle reads images generated from a prompt or caption;
- timestep sensitivity (the paper's Fig. 2b): loss gap between the true and a wrong caption;
- attention IoU: the shape word's cross-attention map against the rendered object's mask.
"""

import numpy as np
import torch

from ..attention import normalise, prompt_tokens, token_attention
from ..backbone import Backbone
from ..generate import generate
from .oracle import AttributeOracle
from .train import to_tensor
from .world import (
    ATTRIBUTE_VALUES,
    CONTENT_ATTRIBUTES,
    Scene,
    attributes_in_text,
    make_renders,
    world_words,
)

# English function words: tokens that are not junk even though no caption of the world uses them.
FUNCTION_WORDS = frozenset(
    "a an the of on in at to with and or but for from by into onto over under near is are was be "
    "this that these those it its as there here".split()
)


def prompt_scores(prompt: str, truth: dict[str, str]) -> dict[str, dict[str, bool]]:
    """Per content attribute: {"present": true word named, "exact": named and no other value}."""
    named = attributes_in_text(prompt)
    return {
        a: {"present": truth[a] in named[a], "exact": named[a] == {truth[a]}} for a in CONTENT_ATTRIBUTES
    }


def token_shares(prompt: str) -> dict[str, int]:
    """Counts of a prompt's words: all, junk (neither a world word nor an English function word),
    repeats of an earlier word of the same prompt, and repeats of a content word (not a function
    word: "a ... on a" is how a caption is written, "green green" is not)."""
    words = prompt.lower().split()
    known = set(world_words()) | FUNCTION_WORDS
    repeated = [w for i, w in enumerate(words) if w in words[:i]]
    return {
        "tokens": len(words),
        "junk": sum(w not in known for w in words),
        "repeats": len(repeated),
        "content_repeats": sum(w not in FUNCTION_WORDS for w in repeated),
    }


def summarise_prompt_scores(scores: list[dict]) -> dict[str, float]:
    out = {}
    for kind in ("present", "exact"):
        for a in CONTENT_ATTRIBUTES:
            out[f"{a}_{kind}"] = float(np.mean([s[a][kind] for s in scores]))
        out[f"content_words_{kind}"] = float(np.mean([s[a][kind] for s in scores for a in CONTENT_ATTRIBUTES]))
        out[f"all_three_{kind}"] = float(np.mean([all(s[a][kind] for a in CONTENT_ATTRIBUTES) for s in scores]))
    return out


def oracle_reads(
    backbone: Backbone, oracle: AttributeOracle, prompts: list[str], steps: int = 50, guidance: float = 7.5,
    seed: int = 0, batch: int = 50,
) -> list[dict[str, str]]:
    """What the oracle sees in one image generated from each prompt."""
    reads = []
    for i in range(0, len(prompts), batch):
        images = generate(backbone, prompts[i : i + batch], steps=steps, guidance=guidance, seed=seed + i)
        reads += oracle.read(images.cpu())
    return reads


def agreement(reads: list[dict], truths: list[dict], attributes=CONTENT_ATTRIBUTES) -> dict[str, float]:
    return {a: float(np.mean([r[a] == t[a] for r, t in zip(reads, truths)])) for a in attributes}


def generation_check(backbone: Backbone, oracle: AttributeOracle, n: int = 200, seed: int = 7, **kw) -> dict:
    """Generate from n random captions; the oracle reads each attribute the caption asked for
    (size and position only where the caption names them)."""
    _, scenes = make_renders(n, seed)
    reads = oracle_reads(backbone, oracle, [s.caption for s in scenes], **kw)
    truths = [vars(s) for s in scenes]
    result = agreement(reads, truths)
    for attr, templates in (("size", (1, 3)), ("position", (2, 3))):
        named = [i for i, s in enumerate(scenes) if s.template in templates]
        result[f"{attr}_when_named"] = agreement([reads[i] for i in named], [truths[i] for i in named], (attr,))[attr]
    return result


@torch.no_grad()
def timestep_sensitivity(
    backbone: Backbone, n_images: int = 20, n_noise: int = 8, n_buckets: int = 10, seed: int = 11
) -> list[dict]:
    """Mean diffusion loss under the true and a wrong caption, per timestep bucket (Fig. 2b).

    The wrong caption changes colour, shape and background; the same (t, noise) serve both.
    """
    images, scenes = make_renders(n_images, seed)
    latents = backbone.encode_images(to_tensor(images))
    rng = np.random.default_rng(seed)
    wrong = [_wrong_caption(s, rng) for s in scenes]
    T = backbone.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(n_buckets):
        lo, hi = b * T // n_buckets, (b + 1) * T // n_buckets
        t = torch.randint(lo, hi, (n_images * n_noise,), generator=g)
        noise = torch.randn((n_images * n_noise, *backbone.latent_shape), generator=g)
        x = latents.repeat_interleave(n_noise, 0)
        loss = {}
        for name, captions in (("true", [s.caption for s in scenes]), ("wrong", wrong)):
            hidden = backbone.encode_text(captions).repeat_interleave(n_noise, 0)
            loss[name] = backbone.diffusion_loss(x, noise.to(x), t.to(x.device), hidden).view(n_images, n_noise)
        gap = (loss["wrong"] - loss["true"]).mean(1)  # per image, averaged over noise
        rows.append({
            "bucket": f"[{lo}, {hi})", "loss_true": float(loss["true"].mean()),
            "loss_wrong": float(loss["wrong"].mean()), "gap": float(gap.mean()),
            "true_lower": float((gap > 0).float().mean()),
        })  # fmt: skip
    return rows


def _wrong_caption(scene: Scene, rng: np.random.Generator) -> str:
    changed = {}
    for a in CONTENT_ATTRIBUTES:
        others = [v for v in ATTRIBUTE_VALUES[a] if v != getattr(scene, a)]
        changed[a] = str(rng.choice(others))
    return Scene(**{**vars(scene), **changed}).caption


@torch.no_grad()
def attention_iou(
    backbone: Backbone, n: int = 20, seed: int = 12, t_min: int = 100, t_max: int = 900, n_timesteps: int = 8,
    prompts: list[str] | None = None, threshold: float = 0.5,
) -> list[dict]:
    """Per render: IoU of each content word's attention map (min-max normalised, > threshold)
    with the object mask (coverage > 0.5); None where the prompt lacks the word.
    prompts: None uses the true captions."""
    images, scenes, cover = make_renders(n, seed, masks=True)
    prompts = prompts or [s.caption for s in scenes]
    latents = backbone.encode_images(to_tensor(images))
    maps = token_attention(backbone, latents, backbone.encode_text(prompts), t_min, t_max, n_timesteps).cpu().numpy()
    rows = []
    for m, scene, mask, prompt in zip(maps, scenes, cover > 0.5, prompts):
        position = {text: pos for pos, text in prompt_tokens(backbone, prompt)}
        row = {}
        for a in CONTENT_ATTRIBUTES:
            word = getattr(scene, a)
            hot = normalise(m[position[word]]) > threshold if word in position else None
            row[a] = None if hot is None else float((hot & mask).sum() / (hot | mask).sum())
        rows.append(row)
    return rows
