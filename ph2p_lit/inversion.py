"""PromptInversion: PH2P (Algorithm 1) as a LightningModule whose only parameter is the soft prompt.

Each training batch is a set of images; the DataModule repeats it `steps` times, so one
training_step is one optimiser step and checkpoints can fall mid-image. The frozen model is
loaded in `setup` and kept outside the module's state.
"""

import time
from typing import Literal

import lightning as L
import torch

from .backbone import Backbone, check_weights_here
from .callbacks import ResultsWriter
from .errors import InputError, above, at_least
from .language_prior import LanguagePrior
from .memory import peak_mb, reset_peak
from .optim import BatchedLBFGS, PH2PStep
from .refine import PromptSearch, Refinement
from .sampler import TimestepSampler, _generator
from .selection import ImageSelector, Selection
from .vocab import Vocabulary

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PromptInversion(L.LightningModule):
    """Recover a hard prompt per image by the diffusion loss (PH2P).

    Args:
        model: diffusers-layout SD checkpoint (folder or hub id); "demo" is the shipped model.
        prompt_length: free token positions L (the authors' 15: positions 1..15 of 77).
        init_prompt: caption to start from; None starts from random vocabulary tokens.
        optimizer: "ph2p": the authors' update (docs/ARCHITECTURE.md): after every closure
            evaluation, ê ← ê − lr · ∇ẽ L, `max_iter` evaluations a step, which is what their
            L-BFGS loop computes once its own writes are overwritten by the projection;
            "lbfgs": a true per-image L-BFGS step on ê (BatchedLBFGS) with a trust region;
            "adam": the paper's Table 4 ablation.
        lr: step size.
        max_iter: closure evaluations a step (ignored by adam).
        history_size: L-BFGS memory (curvature pairs kept).
        max_step: L-BFGS's trust region: no position moves further than max_step x the median
            vocabulary embedding norm in one iteration (None: none).
        steps: optimiser steps per image (N).
        t_min: the timestep window's start t_a (the authors' t ~ U{500..899}).
        t_max: the timestep window's end t_b, exclusive.
        all_timesteps: the "all t" ablation: the window becomes [0, T).
        draws: (t, noise) pairs averaged in one loss evaluation.
        resample_each_eval: fresh (t, noise) at every closure evaluation (as the authors' code,
            which samples inside the forward pass) instead of one set per step; None: fresh for
            "ph2p", one set per step for "lbfgs" (its curvature pairs need one function a step).
        eval_draws: size of the fixed per-image (t, noise) set that scores prompts across steps;
            the prompt with the lowest loss on it is the image's best (the continuous phase's result).
        score_every_n_steps: score the projected prompt on that set every this many steps (and at
            the first and last step) to keep the best.
        patience: > 0 stops an image once its best loss has not improved by more than `min_delta`
            for this many scorings in a row (all images of a batch stop together).
        min_delta: the improvement of the best loss that counts for `patience`.
        refinement: the discrete refinement after the continuous phase (refine.Refinement: guided
            decoding by a language prior, greedy token swaps, optional pruning, all scored by the
            diffusion loss plus the prior); None: off.
        selection: choose each image's prompt by an image generated from it (selection.Selection:
            CLIP or the demo oracle, every n steps), as the authors' code does; None: by the loss.
        metric: the projection's distance, "l2" (the paper's) or "cosine".
        ascii_only: drop vocabulary tokens with non-ASCII characters.
        whole_words: only tokens that end a word (no sub-word pieces).
        english_words: only whole words of letters a-z.
        allow: if given, only these words (each one token).
        deny: words never to use.
        deny_offensive: never use the words of the shipped list ph2p_lit/words/offensive.txt.
        no_repeat: no token twice in a prompt.
        negative_weight: w of negative-image prompting (the paper's Algorithm 2, which uses 1): with
            negative images in the data, each image minimises L(target) − w · L(negative).
        negative_margin: the guard against that objective running away: the negative term counts
            only up to L(target) + margin, so once the negative image fits `margin` worse than the
            target, raising its loss further buys nothing and only L(target) is lowered (a prompt
            of nonsense that fits neither image cannot win). None: the paper's unguarded objective.
        batch_size: images inverted together in one U-Net batch; None: data.batch_size (its home;
            a different value in both is an error).
        seed: seeds the sampler and random initialisation, per image id.
        dtype: dtype of the frozen model; the soft prompt stays float32 (L-BFGS needs it).
        gradient_checkpointing: recompute the U-Net's activations in the backward pass to the
            prompt instead of keeping them (less memory for about one more forward per evaluation).
        offload: keep the VAE and text encoders on the CPU except while they run (less device
            memory; the text encoders then travel to the device at every evaluation).
        local_files_only: never reach the hub when loading `model`.
    """

    def __init__(
        self,
        model: str = "demo",
        prompt_length: int = 15,
        init_prompt: str | None = "a photo of bus of color .",
        optimizer: Literal["ph2p", "lbfgs", "adam"] = "ph2p",
        lr: float = 0.8,
        max_iter: int = 20,
        history_size: int = 100,
        max_step: float | None = 0.5,
        steps: int = 500,
        t_min: int = 500,
        t_max: int = 900,
        all_timesteps: bool = False,
        draws: int = 1,
        resample_each_eval: bool | None = None,
        eval_draws: int = 8,
        score_every_n_steps: int = 10,
        patience: int = 0,
        min_delta: float = 0.0,
        refinement: Refinement | None = None,
        selection: Selection | None = None,
        metric: Literal["l2", "cosine"] = "l2",
        ascii_only: bool = True,
        whole_words: bool = False,
        english_words: bool = False,
        allow: list[str] | None = None,
        deny: list[str] | None = None,
        deny_offensive: bool = True,
        no_repeat: bool = False,
        negative_weight: float = 1.0,
        negative_margin: float | None = 0.05,
        batch_size: int | None = None,
        seed: int = 0,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        gradient_checkpointing: bool = False,
        offload: bool = False,
        local_files_only: bool = False,
    ):
        super().__init__()
        at_least("model", 1, steps=steps, max_iter=max_iter, history_size=history_size, batch_size=batch_size,
                 draws=draws, eval_draws=eval_draws, score_every_n_steps=score_every_n_steps, t_max=t_max)
        at_least("model", 0, t_min=t_min, patience=patience, min_delta=min_delta, negative_weight=negative_weight,
                 negative_margin=negative_margin)
        above("model", 0, lr=lr, max_step=max_step)
        if not all_timesteps and t_min >= t_max:
            raise InputError(f"model.t_min={t_min}, model.t_max={t_max}: the timestep window [t_min, t_max) is empty")
        self.save_hyperparameters()
        # A checkpoint's hparams (and some CLI paths) hold the settings as a plain dict.
        self.refinement = Refinement(**refinement) if isinstance(refinement, dict) else refinement
        self.selection = Selection(**selection) if isinstance(selection, dict) else selection
        prior = self.refinement.language_model if self.refinement is not None else None
        clip = self.selection.clip_model if self.selection is not None and self.selection.select_by == "clip" else None
        check_weights_here({"model.model": model, "model.refinement.language_model": prior,
                            "model.selection.clip_model": clip}, local_files_only)
        self.selector: ImageSelector | None = None
        self.automatic_optimization = False
        self.backbone: Backbone | None = None  # not an nn.Module: never in state_dict
        self.soft_prompt: torch.nn.Parameter | None = None
        self.image_ids: list[str] = []
        self.step_in_batch = 0
        self.finished_prompts: list[str] = []
        self.stopped_early = False
        self.best: dict | None = None  # per image slot of the batch: ids, loss, step, stale scorings
        # The current batch's images (load_images): latents (b, C, h, w), negatives', fixed draws.
        self.latents: torch.Tensor | None = None
        self.negative_latents: torch.Tensor | None = None
        self.fixed_draws: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prior: LanguagePrior | None = None

    # ---------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self.backbone is not None:
            return
        hp = self.hparams
        self.backbone = Backbone.from_pretrained(
            hp.model, dtype=_DTYPES[hp.dtype], device=self.device, local_files_only=hp.local_files_only,
            offload=hp.get("offload", False), gradient_checkpointing=hp.get("gradient_checkpointing", False),
        )
        max_free = self.backbone.max_length - 2
        if not 1 <= hp.prompt_length <= max_free:
            raise InputError(
                f"model.prompt_length={hp.prompt_length}: this tokenizer allows 1..{max_free} "
                f"(model_max_length {self.backbone.max_length} minus BOS and EOS)"
            )
        T = self.backbone.num_train_timesteps
        t_min, t_max = (0, T) if hp.all_timesteps else (hp.t_min, hp.t_max)
        if t_max > T:
            raise InputError(f"model.t_max={t_max} exceeds the scheduler's {T} training timesteps")
        self.sampler = TimestepSampler(t_min, t_max, hp.draws, hp.seed, hp.eval_draws)
        self.vocab = Vocabulary(
            self.backbone.tokenizer, self.backbone.token_table, hp.ascii_only, hp.whole_words,
            hp.english_words, hp.allow, hp.deny, hp.metric, hp.get("deny_offensive", True),
        ).to(self.device)
        D = self.backbone.token_table.shape[1]
        batch_size = self.images_per_batch()
        self.soft_prompt = torch.nn.Parameter(torch.zeros(batch_size, hp.prompt_length, D))  # (B, L, D)
        self.unet_evals = torch.zeros(batch_size, dtype=torch.long)  # U-Net samples per image slot
        self._frame = self._prompt_frame()
        if self.refinement is not None and self.refinement.language_model:
            self.prior = LanguagePrior.from_pretrained(self.refinement.language_model, self.device, hp.local_files_only)
        if self.selection is not None:
            self.selector = ImageSelector(self.selection, self.device, hp.local_files_only)

    def images_per_batch(self) -> int:
        """Images per batch: data.batch_size is its home (the batches are the data's); a module
        given its own must agree with it."""
        data = self._trainer.datamodule if self._trainer is not None else None
        own = self.hparams.batch_size
        theirs = data.hparams.get("batch_size") if data is not None else None
        if own is not None and theirs is not None and own != theirs:
            raise InputError(f"model.batch_size={own} but data.batch_size={theirs}: set data.batch_size only "
                             "(the module follows it)")
        return own or theirs or 1

    def configure_callbacks(self) -> list[L.Callback]:
        # The results writer belongs to the algorithm's output: a user's trainer.callbacks list
        # cannot drop it (Lightning puts this one in place of any ResultsWriter listed there).
        return [ResultsWriter()]

    def _prompt_frame(self) -> dict:
        """Embeddings around the free positions: [BOS] e_1..e_L [EOS] [pad ...]."""
        frame = self.backbone.prompt_embeds([[0] * self.hparams.prompt_length])  # placeholder tokens, cut out
        return {"bos": frame[:, :1], "after": frame[:, 1 + self.hparams.prompt_length :]}

    def hard_prompt_embeds(self, rows: list[list[int]]) -> torch.Tensor:
        """Token-id prompts of any length up to the text encoder's -> text-encoder input (N, S, D):
        [BOS] tokens [EOS] [pad ...], EOS right after the last token (as the tokenizer writes it)."""
        return self.backbone.prompt_embeds(rows).to(self.device)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "ph2p":
            return PH2PStep(self.soft_prompt, lr=hp.lr, max_iter=hp.max_iter)  # ê ← ê − lr·g, g taken at ẽ
        if hp.optimizer == "lbfgs":
            max_step = None if hp.max_step is None else hp.max_step * float(self.vocab.embeddings.norm(dim=-1).median())
            return BatchedLBFGS(self.soft_prompt, lr=hp.lr, max_iter=hp.max_iter, history_size=hp.history_size,
                                max_step=max_step)
        if hp.optimizer == "adam":
            return torch.optim.Adam([self.soft_prompt], lr=hp.lr)
        raise InputError(f"model.optimizer={hp.optimizer!r}: use 'ph2p', 'lbfgs' or 'adam'")

    @property
    def fresh_draws(self) -> bool:
        fresh = self.hparams.resample_each_eval
        return self.hparams.optimizer == "ph2p" if fresh is None else fresh

    # ---------------------------------------------------------------- the math
    def full_prompt(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(b, L, D) free positions -> (b, S, D) text-encoder input."""
        b = prompt_embeds.shape[0]
        bos = self._frame["bos"].to(prompt_embeds).expand(b, -1, -1)
        after = self._frame["after"].to(prompt_embeds).expand(b, -1, -1)
        return torch.cat([bos, prompt_embeds, after], dim=1)

    def prompt_losses(
        self, text_embeds: torch.Tensor, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
        owners: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Diffusion loss of each prompt on its image, averaged over its K draws: (N,).

        text_embeds (N, S, D) text-encoder input; latents (N, C, h, w); t (N, K);
        noise (N, K, C, h, w); owners (N,): the image slot each row belongs to (for the count of
        U-Net evaluations per image, the cost unit every record reports).
        """
        N, K = t.shape
        owners = torch.arange(N) if owners is None else owners
        hidden = self.backbone.encode_embeddings(text_embeds)  # (N, S, D)
        losses = self.backbone.diffusion_loss(
            latents.repeat_interleave(K, 0), noise.flatten(0, 1), t.flatten(), hidden.repeat_interleave(K, 0)
        )
        self.unet_evals.index_add_(0, owners.cpu(), torch.full((N,), K, dtype=torch.long))
        return losses.view(N, K).mean(1)

    def objective(
        self, text_embeds: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, owners: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What each prompt minimises on its image (owners[n]; default row n is image n), (N,):
        the diffusion loss, less the guarded loss of the image's negative when it has one (same t
        and noise for both, so the difference is low-variance)."""
        owners = torch.arange(len(text_embeds), device=self.device) if owners is None else owners
        latents = self.latents[owners]
        if self.negative_latents is None:
            return self.prompt_losses(text_embeds, latents, t, noise, owners)
        # Target and negative in one U-Net batch.
        both = self.prompt_losses(torch.cat([text_embeds, text_embeds]), torch.cat([latents, self.negative_latents[owners]]),
                                  torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([owners, owners]))
        losses, negative = both.chunk(2)
        margin = self.hparams.negative_margin
        if margin is not None:
            negative = torch.minimum(negative, (losses + margin).detach())
        return losses - self.hparams.negative_weight * negative

    def project(self, soft: torch.Tensor) -> torch.Tensor:
        """Proj_E: nearest vocabulary token per position, (b, L, D) -> ids (b, L)."""
        return self.vocab.project_no_repeat(soft) if self.hparams.no_repeat else self.vocab.project(soft)

    def token_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.token_table[ids]

    @torch.no_grad()
    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """Loss of hard prompts (b, L) on each image's fixed (t, noise) set: (b,)."""
        t, noise = self.fixed_draws
        return self.objective(self.full_prompt(self.token_embeds(ids)), t, noise)

    def step_draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (t, noise) of each image's stream: t (b, K), noise (b, K, C, h, w)."""
        shape = self.latents.shape[1:]  # the images' latents: any resolution
        t, noise = zip(*(self.sampler.next(i, shape) for i in self.image_ids))
        return torch.stack(t).to(self.device), torch.stack(noise).to(self.device)

    # ---------------------------------------------------------------- per batch of images
    def load_images(self, batch: dict) -> None:
        """The batch's images as the loss needs them: their latents (and their negatives'), and
        each image's fixed (t, noise) set that scores its prompts."""
        self.image_ids = list(batch["image_id"])
        self.latents = self.backbone.encode_images(batch["pixels"]).float()  # (b, C, h, w)
        negatives = batch.get("negative_pixels")
        self.negative_latents = None if negatives is None else self.backbone.encode_images(negatives).float()
        shape = self.latents.shape[1:]  # the images' latents: any resolution
        t, noise = zip(*(self.sampler.fixed(i, shape) for i in self.image_ids))
        self.fixed_draws = (torch.stack(t).to(self.device), torch.stack(noise).to(self.device))

    def start_images(self, batch: dict) -> None:
        """A new batch of images: encode them, initialise their prompts, forget old history."""
        b = len(batch["image_id"])
        self.step_in_batch, self.stopped_early = 0, False
        self.finished_prompts: list[str] = []
        self.started = time.perf_counter()
        reset_peak(self.device)
        self.unet_evals.zero_()
        self.load_images(batch)
        self.best = {"ids": [None] * b, "loss": [float("inf")] * b, "step": [0] * b, "stale": [0] * b}
        if self.selector is not None:
            self.selector.start(b)
        restored, self._restored = getattr(self, "_restored", None), None
        if restored and restored["image_ids"] == self.image_ids:
            # Resumed mid-batch from a checkpoint: Lightning has put back the soft prompts and
            # the optimiser state; continue at the saved step with the saved draw streams.
            self.step_in_batch = restored["step_in_batch"]
            self.sampler.load_state_dict(restored["sampler"])
            self.best = restored.get("best") or self.best
            self.unet_evals[:b] = torch.tensor(restored.get("unet_evals", [0] * b))
            if self.selector is not None and restored.get("selected"):
                self.selector.best = restored["selected"]
            return
        for i in self.image_ids:
            self.sampler.reset(i)
        with torch.no_grad():
            self.soft_prompt.zero_()
            self.soft_prompt[:b] = self.token_embeds(self.initial_ids()).to(self.soft_prompt)
        optimizer = self.optimizers().optimizer
        optimizer.state.clear()  # each image starts its own L-BFGS / Adam history

    def initial_ids(self) -> torch.Tensor:
        """(b, L): the init prompt's tokens (padded with random vocabulary tokens), per image."""
        L_ = self.hparams.prompt_length
        rows = []
        for image_id in self.image_ids:
            g = _generator(self.hparams.seed, "init", image_id)
            ids = self.vocab.token_ids.cpu()[torch.randint(len(self.vocab), (L_,), generator=g)]
            if self.hparams.init_prompt:
                given = self.backbone.tokenizer(self.hparams.init_prompt, add_special_tokens=False).input_ids[:L_]
                ids[: len(given)] = torch.tensor(given)
            rows.append(ids)
        return torch.stack(rows).to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> dict | None:
        if list(batch["image_id"]) != self.image_ids:
            self.start_images(batch)
        elif self.step_in_batch >= self.hparams.steps or self.stopped_early:
            return None  # these images are finished; their remaining repeats are skipped
        b = len(self.image_ids)
        optimizer = self.optimizers()
        draws = None if self.fresh_draws else self.step_draws()
        slots = torch.arange(b, device=self.device)

        def closure() -> torch.Tensor:  # Algorithm 1, lines 3-5
            optimizer.zero_grad()
            t, noise = self.step_draws() if self.fresh_draws else draws
            soft = self.soft_prompt[:b]  # ê
            projected = self.token_embeds(self.project(soft.detach()))  # ẽ = Proj_E(ê)
            # Delayed projection: the loss is evaluated at ẽ and its gradient is applied to ê.
            # Written so that the forward value is ẽ bit for bit (soft - soft.detach() is exactly
            # 0): the loss then depends on the projected tokens only, not on rounding of ê, and an
            # unchanged projection gives an unchanged loss (L-BFGS's stopping rule reads that).
            prompt = projected + (soft - soft.detach())
            losses = self.objective(self.full_prompt(prompt), t, noise, slots)
            self.manual_backward(losses.sum())  # sum: each image's gradient is its own
            return torch.nn.functional.pad(losses.detach(), (0, self.soft_prompt.shape[0] - b))

        # Each rank inverts its own images: under DDP, gradients must never be averaged across
        # ranks (they belong to different prompts), so the sync is switched off for the step.
        with optimizer.toggle_model(sync_grad=False):
            losses = optimizer.step(closure=closure)[:b]  # ph2p, lbfgs: max_iter evaluations; adam: one
        self.step_in_batch += 1
        self.log("loss", losses.mean(), prog_bar=True, batch_size=b)
        last = self.step_in_batch >= self.hparams.steps
        if last or self.step_in_batch == 1 or self.step_in_batch % self.hparams.score_every_n_steps == 0:
            self.keep_best()
            patience = self.hparams.patience
            self.stopped_early = not last and patience > 0 and all(s >= patience for s in self.best["stale"])
        finished = last or self.stopped_early
        if self.selector is not None and self.selection.due(self.step_in_batch, finished):
            ids = self.current_ids().tolist()
            self.selector.update(self.backbone, [self.vocab.decode(row) for row in ids], ids, batch["pixels"],
                                 self.step_in_batch)
        if not finished:
            return {"losses": losses, "finished": []}
        records = self.results()
        self.finished_prompts = [r["prompt"] for r in records]
        # The continuous prompts go with the records: the results writer saves them as
        # textual-inversion embeddings.
        return {"losses": losses, "finished": records, "soft_prompts": self.soft_prompt[:b].detach().cpu()}

    @torch.no_grad()
    def keep_best(self) -> None:
        """Score the current projected prompts on the fixed set; keep each image's lowest. The
        last scoring is kept too: it is the final prompt's loss the record reports."""
        ids = self.current_ids()
        losses = self.score(ids)
        self.last_scored = (ids, losses)
        for j, (row, loss) in enumerate(zip(ids.tolist(), losses.tolist())):
            if loss < self.best["loss"][j] - self.hparams.min_delta:
                self.best["ids"][j], self.best["loss"][j], self.best["step"][j] = row, loss, self.step_in_batch
                self.best["stale"][j] = 0
            else:
                self.best["stale"][j] += 1

    @torch.no_grad()
    def first_prompt(self) -> str:
        """The batch's first image's prompt as it stands: its result once the batch is finished,
        else the projection of its soft prompt (what the progress bar shows)."""
        if self.finished_prompts:
            return self.finished_prompts[0]
        return self.vocab.decode(self.project(self.soft_prompt[:1])[0].tolist())

    @torch.no_grad()
    def current_ids(self) -> torch.Tensor:
        return self.project(self.soft_prompt[: len(self.image_ids)])

    def results(self) -> list[dict]:
        """One record per image of the current batch: the best prompt of the continuous phase,
        refined when model.refinement is set, with its losses and its cost."""
        final_ids, final_losses = self.last_scored  # scored by keep_best at this, the image's last step
        best = [list(row) for row in self.best["ids"]]
        refined = self.refine(best) if self.refinement is not None else None
        seconds = (time.perf_counter() - self.started) / len(self.image_ids)
        peak = peak_mb(self.device)  # of the whole batch: the images share one U-Net batch
        peak = None if peak is None else round(peak, 1)
        records = []
        for j, image_id in enumerate(self.image_ids):
            ids = best[j] if refined is None else refined[j]["token_ids"]
            records.append({
                "image_id": image_id,
                "prompt": self.vocab.decode(ids),
                "token_ids": ids,
                "continuous_prompt": self.vocab.decode(best[j]),
                "final_prompt": self.vocab.decode(final_ids[j].tolist()),
                "final_loss": float(final_losses[j]),
                "best_loss": self.best["loss"][j],
                "best_step": self.best["step"][j],
                "steps": self.step_in_batch,
                "unet_evals": int(self.unet_evals[j]),
                "seconds": round(seconds, 3),
                "peak_memory_mb": peak,
                **({"refinement": refined[j]} if refined is not None else {}),
            })  # fmt: skip
        if self.selector is not None:
            for record, chosen in zip(records, self.selector.best):
                record.update(prompt=self.vocab.decode(chosen["ids"]), token_ids=chosen["ids"], loss_prompt=record["prompt"],
                              selected_by=self.selection.select_by, best_similarity=chosen["similarity"],
                              selected_step=chosen["step"])
        return records

    # ---------------------------------------------------------------- discrete refinement
    def refine(self, starts: list[list[int]]) -> list[dict]:
        """Greedy swaps and pruning from each image's best prompt (refine.PromptSearch) on the
        image's refinement draws; per image: the refined ids, the unpruned ones, the losses."""
        settings: Refinement = self.refinement
        b = len(starts)
        self._refine_draws = self._draw_set("refine", settings.draws, settings.window, spread=True)
        evals_before = self.unet_evals[:b].clone()
        search = PromptSearch(self._hard_objective, self._hard_gradient, self.vocab, settings, self.prior,
                              self.hparams.no_repeat, max_length=self.hparams.prompt_length,
                              max_decode_length=self.backbone.max_length - 2)
        outcome = search.run(starts, self.soft_prompt[:b].detach())
        refine_evals = (self.unet_evals[:b] - evals_before).tolist()
        holds = self._fresh_check(starts, [o.ids for o in outcome]) if settings.check_draws else [None] * b
        return [
            {
                "token_ids": o.ids,
                "unpruned_prompt": self.vocab.decode(o.unpruned_ids),
                "unpruned_token_ids": o.unpruned_ids,
                "loss": o.loss,
                "prior_nll": o.prior_nll if self.prior is not None else None,
                "objective": o.objective,
                "start_objective": o.start_objective,
                "swaps": o.swaps,
                "deletions": o.deletions,
                "rounds": o.rounds,
                "unet_evals": refine_evals[j],
                **({"fresh_check": holds[j]} if holds[j] is not None else {}),
            }
            for j, o in enumerate(outcome)
        ]

    def _draw_set(self, name: str, n: int, window: tuple[int, int] | None, spread: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-image set of n (t, noise) pairs: t (b, n), noise (b, n, C, h, w)."""
        lo, hi = window or (self.sampler.t_min, self.sampler.t_max)
        shape = self.latents.shape[1:]  # the images' latents: any resolution
        t, noise = zip(*(self.sampler.draw_set((name, i), n, lo, hi, shape, spread) for i in self.image_ids))
        return torch.stack(t).to(self.device), torch.stack(noise).to(self.device)

    def _hard_batches(self, rows: list[list[int]], owners: list[int], draws: torch.Tensor):
        """Split (rows x draws) into U-Net calls of at most max_batch_samples samples."""
        per_call = max(1, self.refinement.max_batch_samples // max(1, len(draws)))
        t_all, noise_all = self._refine_draws
        for at in range(0, len(rows), per_call):
            chunk = torch.tensor(owners[at : at + per_call], device=self.device)
            embeds = self.hard_prompt_embeds(rows[at : at + per_call])
            yield embeds, t_all[chunk][:, draws], noise_all[chunk][:, draws], chunk

    @torch.no_grad()
    def _hard_objective(self, rows: list[list[int]], owners: list[int], draws: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.objective(*batch) for batch in self._hard_batches(rows, owners, draws)])

    def _hard_gradient(self, rows: list[list[int]], owners: list[int], draws: torch.Tensor) -> list[torch.Tensor]:
        grads = []
        for embeds, t, noise, chunk in self._hard_batches(rows, owners, draws):
            embeds.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self.objective(embeds, t, noise, chunk).sum(), embeds)
            grads.append(grad)
        grads = torch.cat(grads)
        return [grads[n, 1 : 1 + len(row)] for n, row in enumerate(rows)]  # the free positions

    @torch.no_grad()
    def _fresh_check(self, starts: list[list[int]], finals: list[list[int]]) -> list[dict]:
        """Does the final prompt also beat the start on fresh draws the search never saw, by the
        diffusion loss alone and by the objective (loss + prior)? Not counted in unet_evals: it
        measures the method, it is not part of it."""
        settings = self.refinement
        kept, saved = self._refine_draws, self.unet_evals.clone()
        self._refine_draws = self._draw_set("check", settings.check_draws, settings.window, spread=False)
        owners = list(range(len(starts)))
        every = torch.arange(settings.check_draws)
        start, final = self._hard_objective(starts, owners, every), self._hard_objective(finals, owners, every)
        self._refine_draws, self.unet_evals = kept, saved
        checks = [{"loss": bool(f <= s)} for s, f in zip(start.tolist(), final.tolist())]
        if self.prior is not None:
            w = settings.prior_weight
            start = start + w * self.prior.nll([self.vocab.decode(r) for r in starts])[0].to(start)
            final = final + w * self.prior.nll([self.vocab.decode(r) for r in finals])[0].to(final)
        for check, s, f in zip(checks, start.tolist(), final.tolist()):
            check["objective"] = bool(f <= s)
        return checks

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ph2p"] = {
            "image_ids": self.image_ids,
            "step_in_batch": self.step_in_batch,
            "sampler": self.sampler.state_dict(),
            "best": self.best if self.image_ids else None,
            "unet_evals": self.unet_evals[: len(self.image_ids)].tolist(),
            "selected": self.selector.best if self.selector is not None and self.image_ids else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = checkpoint.get("ph2p")
