"""The timestep-window sampler: a seeded stream of (t, noise) draws for each image.

Each draw is a pure function of (seed, image id, draw index), so an image gets the same stream
whatever its batch, rank or restart; the only state is how far each image's stream has gone.
"""

import hashlib

import torch

from .errors import InputError


def _generator(*key) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class TimestepSampler:
    """t ~ U{t_min, ..., t_max - 1} and eps ~ N(0, I), `draws` pairs a step.

    The paper's window is [500, 900) of T = 1000 (Algorithm 1's [t_a, T]); [0, T) is its
    "all t" ablation.
    """

    def __init__(self, t_min: int = 500, t_max: int = 900, draws: int = 1, seed: int = 0, eval_draws: int = 8):
        if not 0 <= t_min < t_max:
            raise InputError(f"timestep window [{t_min}, {t_max}) is empty or negative")
        if draws < 1 or eval_draws < 1:
            raise InputError("draws and eval_draws must be at least 1")
        self.t_min, self.t_max, self.draws, self.seed, self.eval_draws = t_min, t_max, draws, seed, eval_draws
        self.position: dict[str, int] = {}

    def _draw(self, key: tuple, n: int, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(self.seed, *key)
        t = torch.randint(self.t_min, self.t_max, (n,), generator=g)
        noise = torch.randn((n, *latent_shape), generator=g)
        return t, noise

    def next(self, image_id: str, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's next `draws` pairs: t (K,), noise (K, C, h, w); advances its stream."""
        step = self.position.get(image_id, 0)
        self.position[image_id] = step + 1
        return self._draw(("step", image_id, step), self.draws, latent_shape)

    def fixed(self, image_id: str, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed set of `eval_draws` pairs per image, t spread evenly over the window.

        Losses on it compare across steps, so the best prompt is chosen without regenerating images.
        """
        _, noise = self._draw(("fixed", image_id), self.eval_draws, latent_shape)
        t = torch.linspace(self.t_min, self.t_max - 1, self.eval_draws).round().long()
        return t, noise

    def draw_set(
        self, key: tuple, n: int, t_min: int, t_max: int, latent_shape: tuple[int, ...], spread: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Another per-image set of n pairs, named by `key` (e.g. ("refine", image_id)), on its own
        window: t evenly spread over [t_min, t_max) if `spread`, else uniform draws."""
        g = _generator(self.seed, "set", *key)
        t = torch.randint(t_min, t_max, (n,), generator=g)
        noise = torch.randn((n, *latent_shape), generator=g)
        if spread:
            t = torch.linspace(t_min, t_max - 1, n).round().long()
        return t, noise

    def reset(self, image_id: str) -> None:
        self.position.pop(image_id, None)

    def state_dict(self) -> dict:
        return {"position": dict(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state["position"])
