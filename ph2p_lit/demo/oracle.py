"""The attribute oracle: a small CNN that reads colour, shape, background, size and position of a render.

It scores generated images against the caption that asked for them; it is trained on fresh renders
only, never on model outputs.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .world import ATTRIBUTE_VALUES

ORACLE_FILE = Path(__file__).parent / "oracle.safetensors"


class AttributeOracle(nn.Module):
    """Images in [-1, 1], (B, 3, 32, 32) -> one logit vector per attribute."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(v)) for name, v in ATTRIBUTE_VALUES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        """The attribute values the oracle sees in each image."""
        logits = self(images.float())
        return [
            {name: ATTRIBUTE_VALUES[name][int(logits[name][i].argmax())] for name in logits}
            for i in range(images.shape[0])
        ]

    @classmethod
    def load(cls, path: str | Path = ORACLE_FILE) -> "AttributeOracle":
        oracle = cls()
        oracle.load_state_dict(load_file(str(path)))
        return oracle.eval()

    def save(self, path: str | Path = ORACLE_FILE) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))
