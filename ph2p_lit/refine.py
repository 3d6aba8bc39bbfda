"""Discrete refinement of hard prompts after the continuous PH2P phase: greedy coordinate search
and pruning, each candidate scored by the diffusion loss on the image's refinement draws plus
weight x a language prior's negative log-likelihood (the part that rules out hedges).

The search knows prompts as token-id lists and asks two callables about them, so it runs the same
on the U-Net (PromptInversion) and on a toy objective in the tests:
    objective(rows, owners, draws) -> (N,)   mean loss of each row on draws of image owners[n]
    gradient(rows, owners, draws) -> [(n_i, D)]  d loss / d token embedding at each position
"""

from dataclasses import dataclass, field

import torch

from .errors import InputError, at_least
from .language_prior import LanguagePrior
from .vocab import Vocabulary


@dataclass
class Refinement:
    """Settings of the discrete refinement (model.refinement in the config; null switches it off).

    Args:
        draws: (t, noise) pairs per image that score every candidate (the same pairs for all
            candidates, so their differences are low-variance); more draws, choices that hold.
        window: [t_min, t_max) of those draws; None: the model's timestep window.
        screen_draws: a strided subset of the draws on which all candidates of a round are
            scored first; the `finalists` best then get the remaining draws.
        top_k: options per position by the first-order estimate g_i . (e_v - e_i) (AutoPrompt,
            GCG) from the gradient at the current tokens.
        nearest_k: candidates per position among the tokens nearest the continuous prompt.
        prior_k: options per position proposed by the language model given the words before.
        beams: with a prior, first write a prompt per image by guided decoding (the prior
            proposes each next word, the diffusion loss ranks the partial prompts, this many kept)
            and start the search from it when it beats the continuous phase's prompt; 0: off.
        prior_min_prob: proposals of the prior less likely than this are not tried.
        per_position: of a position's options, those with the lowest estimated objective (the
            first-order loss change plus the prior's exact change) that the U-Net scores.
        finalists: candidates per image scored on all draws each round.
        budget: U-Net sample evaluations per image for the search rounds; it stops earlier when no
            candidate improves.
        min_gain: a swap is taken only if it lowers the objective by more than this fraction of
            the current diffusion loss. Without a prior, swaps that add a hedge lower the loss a
            little and swaps that put the right word in place of a wrong one lower it a lot
            (docs/results.md: 0.02 keeps the search from adding hedges on the demo).
        prune_tolerance: delete a token while the objective rises by less than this fraction of
            the best prompt's diffusion loss; None: no pruning. Off by default: on the demo it
            deleted 1 token in 100 prompts with the prior, and without a prior it deleted true
            background words whose removal lowers the loss (docs/results.md).
        language_model: the prior: a causal LM folder or hub id, "demo" for the demo world's
            caption model; None: the diffusion loss alone.
        prior_weight: loss units per nat of the prior's negative log-likelihood.
        check_draws: if > 0, also score the start and final prompts on this many fresh draws and
            record whether the choice holds there (costs evaluations; for measuring).
        max_batch_samples: U-Net samples per call (candidates x draws are split to fit memory).
    """

    draws: int = 32
    window: tuple[int, int] | None = None
    screen_draws: int = 4
    top_k: int = 8
    nearest_k: int = 2
    prior_k: int = 12
    beams: int = 4
    prior_min_prob: float = 0.01
    per_position: int = 4
    finalists: int = 4
    budget: int = 3000
    min_gain: float = 0.02
    prune_tolerance: float | None = None
    language_model: str | None = None
    prior_weight: float = 1e-3
    check_draws: int = 0
    max_batch_samples: int = 2048

    def __post_init__(self):
        section = "model.refinement"
        at_least(section, 1, draws=self.draws, screen_draws=self.screen_draws, max_batch_samples=self.max_batch_samples)
        # 0 is meaningful for these: no candidates of that kind (per_position=0 with pruning: pruning only).
        at_least(section, 0, top_k=self.top_k, nearest_k=self.nearest_k, prior_k=self.prior_k, beams=self.beams,
                 per_position=self.per_position, finalists=self.finalists, prior_min_prob=self.prior_min_prob,
                 budget=self.budget, min_gain=self.min_gain, prune_tolerance=self.prune_tolerance,
                 prior_weight=self.prior_weight, check_draws=self.check_draws)
        if not self.prior_min_prob <= 1:
            raise InputError(f"{section}.prior_min_prob={self.prior_min_prob}: must be at most 1 (a probability)")
        if self.window is not None and not 0 <= self.window[0] < self.window[1]:
            raise InputError(f"{section}.window={list(self.window)}: must be [t_min, t_max) with 0 <= t_min < t_max")


@dataclass
class Refined:
    """One image's outcome."""

    ids: list[int]
    unpruned_ids: list[int]
    start_objective: float
    objective: float
    loss: float
    prior_nll: float
    swaps: int = 0
    deletions: int = 0
    rounds: int = 0
    evaluations: int = 0
    history: list[float] = field(default_factory=list)


class PromptSearch:
    """Greedy coordinate search and pruning over a batch of images, each with its own prompt."""

    def __init__(self, objective, gradient, vocab: Vocabulary, settings: Refinement,
                 prior: LanguagePrior | None = None, no_repeat: bool = False, max_length: int = 75,
                 max_decode_length: int | None = None):
        self.objective, self.gradient, self.vocab, self.s = objective, gradient, vocab, settings
        self.prior, self.no_repeat, self.max_length = prior, no_repeat, max_length
        self._nll: dict[tuple[int, ...], float] = {}
        # Guided decoding may write a whole caption, up to what the text encoder reads.
        self.max_decode_length = max_decode_length or max_length
        self.token_ids = vocab.token_ids.cpu()
        self.allowed = set(self.token_ids.tolist())
        self.column = {int(v): c for c, v in enumerate(self.token_ids.tolist())}  # token id -> row of vocab.embeddings
        K = settings.draws
        self.screen = torch.arange(0, K, max(1, K // max(1, min(settings.screen_draws, K))))[: settings.screen_draws]
        self.rest = torch.tensor([k for k in range(K) if k not in set(self.screen.tolist())], dtype=torch.long)

    # ---- scoring -------------------------------------------------------------------------
    def prior_nll(self, rows: list[list[int]]) -> torch.Tensor:
        """The prior's NLL of each row, (N,); each distinct prompt goes through the LM once per search."""
        if self.prior is None or not rows:
            return torch.zeros(len(rows))
        new = list(dict.fromkeys(tuple(row) for row in rows if tuple(row) not in self._nll))
        if new:
            values = self.prior.nll([self.vocab.decode(list(row)) for row in new])[0]
            self._nll.update(zip(new, values.tolist()))
        return torch.tensor([self._nll[tuple(row)] for row in rows])

    def _split_scores(self, rows: list[list[int]], owners: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of each row on the screening draws and on the rest, (N,) each."""
        return self._score(rows, owners, self.screen), self._score(rows, owners, self.rest)

    def _score(self, rows: list[list[int]], owners: list[int], draws: torch.Tensor) -> torch.Tensor:
        if not rows or not len(draws):  # no draws (the screening took them all): no U-Net call, weight 0
            return torch.zeros(len(rows))
        return self.objective(rows, owners, draws).detach().float().cpu()

    # ---- candidates ----------------------------------------------------------------------
    def _prior_ids(self, rows: list[list[int]]) -> list[list[set[int]]]:
        """Per row and position: tokens the language model proposes after the words before it."""
        if self.prior is None or self.s.prior_k == 0:
            return [[set() for _ in row] for row in rows]
        prefixes = [self.vocab.decode(row[:i]) for row in rows for i in range(len(row))]
        words = iter(self.prior.next_words(prefixes, self.s.prior_k))
        out = []
        for row in rows:
            per_position = []
            for _ in row:
                ids = {self._single_token(w) for w in next(words)}
                per_position.append({i for i in ids if i in self.allowed})
            out.append(per_position)
        return out

    def _single_token(self, word: str) -> int | None:
        pieces = self.vocab.tokenizer(word, add_special_tokens=False).input_ids
        return pieces[0] if len(pieces) == 1 else None

    def candidates(self, rows: list[list[int]], owners: list[int], soft: torch.Tensor | None,
                   nll_now: list[float]) -> list[list[list[int]]]:
        """Single-token swaps of each row. Per position the options are the gradient's top-k, the
        tokens nearest the continuous prompt and the prior's proposals; of these, the `per_position`
        with the lowest estimated objective change (first-order loss change + weight x the prior's
        exact change) go on to the U-Net. No duplicates, no unchanged row."""
        grads = self.gradient(rows, owners, self.screen)
        proposed = self._prior_ids(rows)
        table = self.vocab.embeddings  # (V', D) the allowed tokens
        out = []
        for j, (row, g) in enumerate(zip(rows, grads)):
            g = g.float().to(table.device)  # (n, D)
            current = self.vocab.embedding_of(row).to(table.device)  # (n, D)
            change = (g @ table.T - (g * current).sum(-1, keepdim=True)).cpu()  # (n, V'): first-order loss change
            top = change.topk(min(self.s.top_k, len(self.vocab)), largest=False).indices
            near = None
            if soft is not None and self.s.nearest_k:
                k = min(self.s.nearest_k, len(self.vocab))
                near = self.vocab.scores(soft[owners[j], : len(row)]).topk(k).indices.cpu()
            seen, swaps, estimate = {tuple(row)}, [], []
            for i in range(len(row)):
                columns = set(top[i].tolist()) | {self.column[v] for v in proposed[j][i]}
                if near is not None and i < len(near):
                    columns |= set(near[i].tolist())
                for c in sorted(columns):
                    v = int(self.token_ids[c])
                    new = row[:i] + [v] + row[i + 1 :]
                    if (self.no_repeat and v in row) or tuple(new) in seen:
                        continue
                    seen.add(tuple(new))
                    swaps.append((i, new))
                    estimate.append(float(change[i, c]))
            if swaps:
                prior_change = self.prior_nll([new for _, new in swaps]) - nll_now[j]
                estimate = torch.tensor(estimate) + self.s.prior_weight * prior_change
            kept = []
            for i in range(len(row)):
                mine = [k for k, (pos, _) in enumerate(swaps) if pos == i]
                mine.sort(key=lambda k: float(estimate[k]))
                kept += [swaps[k][1] for k in mine[: self.s.per_position]]
            out.append(kept)
        return out

    # ---- guided decoding -----------------------------------------------------------------
    def decode(self, b: int) -> dict[tuple[int, tuple[int, ...]], float]:
        """Prompts per image written left to right by the prior and chosen by the image.

        Each of the `beams` partial prompts is extended by the prior's likeliest next words
        (`prior_k`, each at least `prior_min_prob` likely); each extension is judged by its
        lookahead, the prior's greedy completion of it into a whole prompt, scored by the
        objective on the screening draws: a colour is then compared in a caption's context, where
        the loss tells values apart best, not as a dangling "a red". Returns every whole prompt
        seen (lookaheads and prompts the prior ended), keyed by (image, token ids), with its
        objective on the screening draws.
        """
        beams = [[[]] for _ in range(b)]
        screened: dict[tuple[int, tuple[int, ...]], float] = {}  # (image, whole prompt) -> objective on screening draws
        for _ in range(self.max_decode_length):
            prefixes = [(j, row) for j in range(b) for row in beams[j]]
            if not prefixes:
                break
            texts = [self.vocab.decode(row) for _, row in prefixes]
            proposals = self.prior.next_words_or_end(texts, self.s.prior_k, self.s.prior_min_prob)
            grown: list[tuple[int, list[int]]] = []
            for (j, row), words in zip(prefixes, proposals):
                for word in words:
                    if word is None:  # the prior ends the prompt here
                        if row:
                            self._screen([(j, row)], screened)
                        continue
                    token = self._single_token(word)
                    if token in self.allowed and not (self.no_repeat and token in row):
                        grown.append((j, row + [token]))
            if not grown:
                break
            tails = self.prior.complete([self.vocab.decode(row) for _, row in grown], self.max_decode_length)
            whole = [(j, self._extend(row, tail)) for (j, row), tail in zip(grown, tails)]
            self._screen(whole, screened)
            ranked = sorted(range(len(grown)), key=lambda k: screened[(whole[k][0], tuple(whole[k][1]))])
            beams = [[] for _ in range(b)]
            for k in ranked:
                j, row = grown[k]
                if len(beams[j]) < self.s.beams and len(row) < self.max_decode_length:
                    beams[j].append(row)
        return screened

    def _extend(self, row: list[int], tail: str) -> list[int]:
        ids = [t for t in self.vocab.tokenizer(tail, add_special_tokens=False).input_ids if t in self.allowed]
        return (row + ids)[: self.max_decode_length]

    def _screen(self, prompts: list[tuple[int, list[int]]], screened: dict) -> None:
        """Objective on the screening draws of the whole prompts not scored yet."""
        new = list(dict.fromkeys((j, tuple(row)) for j, row in prompts if (j, tuple(row)) not in screened))
        if not new:
            return
        rows, owners = [list(r) for _, r in new], [j for j, _ in new]
        score = self._score(rows, owners, self.screen) + self.s.prior_weight * self.prior_nll(rows)
        for key, value in zip(new, score.tolist()):
            screened[key] = value
            self.decode_evaluations[key[0]] += len(self.screen)

    def _best_start(self, starts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """Each image's start and its loss on the screening draws and on the rest: its given
        prompt or, with a prior and beams > 0, the best of the guided decoding's prompts,
        whichever has the lower objective on all draws (the `finalists` best on the screening
        draws are scored on all)."""
        b, K = len(starts), self.s.draws
        rows, owners = [list(row) for row in starts], list(range(b))
        if self.prior is not None and self.s.beams:
            screened = self.decode(b)
            for j in range(b):
                mine = sorted((value, row) for (o, row), value in screened.items() if o == j)
                rows += [list(row) for _, row in mine[: self.s.finalists]]
                owners += [j] * len(mine[: self.s.finalists])
        screen, rest = self._split_scores(rows, owners)
        score = (len(self.screen) * screen + len(self.rest) * rest) / K + self.s.prior_weight * self.prior_nll(rows)
        for j in owners:
            self.decode_evaluations[j] += K
        chosen = [min((k for k, o in enumerate(owners) if o == j), key=lambda k: float(score[k])) for j in range(b)]
        return [rows[k] for k in chosen], screen[chosen], rest[chosen]

    # ---- the search ----------------------------------------------------------------------
    def run(self, starts: list[list[int]], soft: torch.Tensor | None = None) -> list[Refined]:
        """Refine each image's start prompt (image j is owner j)."""
        b, K = len(starts), self.s.draws
        owners = list(range(b))
        self.decode_evaluations = [0] * b
        starts, screen_loss, rest_loss = self._best_start(starts)
        loss = (len(self.screen) * screen_loss + len(self.rest) * rest_loss) / K
        nll = self.prior_nll(starts)
        state = [
            Refined(ids=list(row), unpruned_ids=list(row), start_objective=float(loss[j] + self.s.prior_weight * nll[j]),
                    objective=float(loss[j] + self.s.prior_weight * nll[j]), loss=float(loss[j]), prior_nll=float(nll[j]),
                    evaluations=self.decode_evaluations[j])
            for j, row in enumerate(starts)
        ]
        screen_now = [float(screen_loss[j] + self.s.prior_weight * nll[j]) for j in range(b)]
        searching = set(owners)
        while searching:
            active = sorted(j for j in searching if state[j].evaluations + self._round_cost(state[j].ids) <= self.s.budget)
            searching = set(active)
            if not active:
                break
            swaps = self.candidates([state[j].ids for j in active], active, soft, [state[j].prior_nll for j in active])
            for j in active:
                state[j].evaluations += len(self.screen)  # the gradient's forward+backward
                state[j].rounds += 1
            improved = self._round(active, swaps, state, screen_now)
            searching -= {j for j in active if j not in improved}
        for j, image in enumerate(state):
            image.unpruned_ids = list(image.ids)
        if self.s.prune_tolerance is not None:
            self.prune(state)
        return state

    def _round_cost(self, row: list[int]) -> int:
        return len(self.screen) * (1 + len(row) * self.s.per_position) + self.s.finalists * len(self.rest)

    def _round(self, active: list[int], swaps: list[list[list[int]]], state: list[Refined], screen_now: list[float]) -> set[int]:
        """Score every swap on the screening draws, the best few on all; take each image's best
        if it lowers its objective. Returns the images that improved."""
        rows = [row for per_image in swaps for row in per_image]
        owners = [j for j, per_image in zip(active, swaps) for _ in per_image]
        w = self.s.prior_weight
        nll = self.prior_nll(rows)
        screened = self._score(rows, owners, self.screen) + w * nll
        finalists, at = [], 0
        for j, per_image in zip(active, swaps):
            state[j].evaluations += len(per_image) * len(self.screen)
            scores = screened[at : at + len(per_image)]
            order = scores.argsort()[: self.s.finalists].tolist()
            # Only swaps that look better on the screening draws are worth the remaining draws.
            finalists += [(j, at + k) for k in order if scores[k] < screen_now[j]]
            at += len(per_image)
        rest = self._score([rows[k] for _, k in finalists], [j for j, _ in finalists], self.rest)
        best: dict[int, tuple[float, int, float]] = {}
        n_screen, n_rest, K = len(self.screen), len(self.rest), self.s.draws
        for (j, k), rest_loss in zip(finalists, rest.tolist()):
            state[j].evaluations += n_rest
            screen_loss = float(screened[k] - w * nll[k])
            loss = (n_screen * screen_loss + n_rest * rest_loss) / K
            objective = loss + w * float(nll[k])
            gain = state[j].objective - objective
            if gain > self.s.min_gain * state[j].loss and (j not in best or objective < best[j][0]):
                best[j] = (objective, k, loss)
        for j, (objective, k, loss) in best.items():
            image = state[j]
            image.ids, image.objective, image.loss, image.prior_nll = rows[k], objective, loss, float(nll[k])
            image.swaps += 1
            image.history.append(objective)
            screen_now[j] = float(screened[k])
        return set(best)

    def prune(self, state: list[Refined]) -> None:
        """Shortest prompt within tolerance of the best: delete the token whose removal costs
        least while the objective stays within prune_tolerance x the best's loss of the best."""
        w, tol = self.s.prior_weight, self.s.prune_tolerance
        best = {j: (image.objective, image.loss) for j, image in enumerate(state)}
        open_ = [j for j, image in enumerate(state) if len(image.ids) > 1]
        all_draws = torch.arange(self.s.draws)
        while open_:
            rows, owners = [], []
            for j in open_:
                for i in range(len(state[j].ids)):
                    rows.append(state[j].ids[:i] + state[j].ids[i + 1 :])
                    owners.append(j)
            loss, nll = self._score(rows, owners, all_draws), self.prior_nll(rows)
            objective = loss + w * nll
            still_open = []
            for j in open_:
                mine = [k for k, o in enumerate(owners) if o == j]
                state[j].evaluations += len(mine) * self.s.draws
                k = min(mine, key=lambda m: float(objective[m]))
                best_objective, best_loss = best[j]
                if float(objective[k]) <= best_objective + tol * best_loss:
                    image = state[j]
                    image.ids, image.objective, image.loss = rows[k], float(objective[k]), float(loss[k])
                    image.prior_nll = float(nll[k])
                    image.deletions += 1
                    if image.objective < best_objective:
                        best[j] = (image.objective, image.loss)
                    if len(image.ids) > 1:
                        still_open.append(j)
            open_ = still_open
