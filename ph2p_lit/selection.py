"""Choosing each image's prompt by an image generated from it, as the authors' code does,
instead of by the diffusion loss alone (model.selection).

Every `every_n_steps` (and at the first and last step) the current projected prompts are scored:
an image is generated from each (`generation_steps` DDIM steps, CFG `guidance`, the same noise for
every prompt) and compared with the target by `select_by`: "clip", the CLIP image similarity
(`clip_model` names the CLIPModel), or "oracle", the demo world's attribute oracle in CLIP's
place. Each scoring costs a generation per image. The module keeps the best per image and
reports it as the prompt; its own (loss-chosen, refined) prompt stays in the record as
`loss_prompt`.
"""

from dataclasses import dataclass
from typing import Literal

import torch

from .backbone import Backbone
from .errors import InputError
from .generate import generate
from .similarity import load_similarity


@dataclass
class Selection:
    """Settings of the selection by image (model.selection in the config; null: by the loss).

    Args:
        select_by: "clip": CLIP image similarity between the target and an image generated from
            the prompt; "oracle": the demo world's attribute oracle in CLIP's place.
        every_n_steps: score the current prompts this often (and at the first and last step);
            each scoring generates one image per image of the batch.
        clip_model: the CLIPModel (hub id or folder) for select_by: clip.
        generation_steps: DDIM steps of each generated image.
        guidance: classifier-free guidance scale of each generated image.
    """

    select_by: Literal["clip", "oracle"] = "clip"
    every_n_steps: int = 10
    clip_model: str = "openai/clip-vit-large-patch14"
    generation_steps: int = 20
    guidance: float = 7.5

    def __post_init__(self):
        if self.every_n_steps < 1 or self.generation_steps < 1:
            raise InputError(f"model.selection: every_n_steps={self.every_n_steps} and generation_steps="
                             f"{self.generation_steps} must be at least 1")

    def due(self, step: int, finished: bool) -> bool:
        return finished or step == 1 or step % self.every_n_steps == 0


class ImageSelector:
    """The best prompt so far per image slot of a batch, by `Selection`'s image similarity."""

    def __init__(self, settings: Selection, device, local_files_only: bool = False):
        self.settings = settings
        self.similarity = load_similarity(settings.select_by, settings.clip_model, device, local_files_only)
        self.best: list[dict | None] = []

    def start(self, n_images: int) -> None:
        self.best = [None] * n_images

    @torch.no_grad()
    def update(self, backbone: Backbone, prompts: list[str], ids: list[list[int]], targets: torch.Tensor, step: int) -> None:
        s = self.settings
        generated = generate(backbone, prompts, s.generation_steps, s.guidance, shared_noise=True)
        scores = self.similarity(targets[: len(prompts)], generated).tolist()
        for j, (row, score) in enumerate(zip(ids, scores)):
            if self.best[j] is None or score > self.best[j]["similarity"]:
                self.best[j] = {"similarity": score, "ids": row, "step": step}
