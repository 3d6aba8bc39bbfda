"""Image-image similarity: how close a generated image is to its target.

CLIP (the paper's measure and the authors' best-prompt criterion) and, on the demo world, the
attribute oracle, which plays CLIP's part there because no CLIP model knows the demo's images.
Both take pairs of images in [-1, 1], (B, 3, H, W), and return (B,) similarities, higher = closer.
"""

import torch
import torch.nn.functional as F

from .demo.oracle import AttributeOracle
from .demo.world import CONTENT_ATTRIBUTES
from .errors import InputError
from .images import to_uint8


def load_offline(what: str, name: str, loader, local_files_only: bool):
    """`loader(name)` with a one-line error naming the weights when they are not on this machine."""
    try:
        return loader(name, local_files_only=local_files_only)
    except OSError as e:
        raise InputError(f"{what}={name!r}: cannot load it offline; fetch it once into the Hugging Face cache "
                         f"(hf download {name}) or give a local folder, or set {what}=null to skip") from e


class ClipSimilarity:
    """Cosine similarity of CLIP image embeddings, with the model's own preprocessing."""

    def __init__(self, name: str = "openai/clip-vit-large-patch14", device="cpu", local_files_only: bool = False):
        from transformers import CLIPImageProcessor, CLIPModel  # loaded here, not at import: `--help` must not wait

        self.model = load_offline("clip_model", name, CLIPModel.from_pretrained, local_files_only)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.processor = load_offline("clip_model", name, CLIPImageProcessor.from_pretrained, local_files_only)
        self.device = device

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> unit embeddings (B, D)."""
        pixels = self.processor(images=list(to_uint8(images)), return_tensors="pt").pixel_values.to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        return F.normalize(features.float(), dim=-1)

    def __call__(self, targets: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return (self.embed(targets) * self.embed(generated)).sum(-1)


class OracleSimilarity:
    """The probability that the demo oracle reads the same colour, shape and background in both
    images (mean over the three): the demo world's stand-in for CLIP similarity."""

    def __init__(self, device="cpu"):
        self.oracle = AttributeOracle.load().to(device).requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, targets: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        a = self.oracle(targets.float().to(self.device))
        b = self.oracle(generated.float().to(self.device))
        same = [(a[k].softmax(-1) * b[k].softmax(-1)).sum(-1) for k in CONTENT_ATTRIBUTES]
        return torch.stack(same).mean(0)


def load_similarity(kind: str, clip_model: str, device, local_files_only: bool = False):
    """"clip" or "oracle" -> a similarity callable."""
    if kind == "clip":
        return ClipSimilarity(clip_model, device, local_files_only)
    if kind == "oracle":
        return OracleSimilarity(device)
    raise InputError(f"select_by={kind!r}: use clip or oracle (leave model.selection unset to keep the best prompt by its loss)")
