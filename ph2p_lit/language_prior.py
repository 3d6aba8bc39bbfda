"""The language prior: how likely a causal language model finds a prompt's text.

The discrete refinement adds weight x this negative log-likelihood to the diffusion loss, so that
among prompts that fit the image about as well, the one written as a caption wins over a list of
hedges; `ph2p evaluate` reports the same model's perplexity of the prompts (the field's measure of
readability). Any model `AutoModelForCausalLM.from_pretrained` loads will do (GPT-2 for SD 1.x);
"demo" is the small caption model shipped with the demo world.
"""

from pathlib import Path

import torch

from .errors import InputError

DEMO_LANGUAGE_MODEL = str(Path(__file__).parent / "demo" / "language_model")


class LanguagePrior:
    """Scores texts by a frozen causal LM: each text is read as BOS + its tokens + EOS, so a
    prompt that stops mid-sentence costs as much as one that rambles."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.end_id = tokenizer.eos_token_id
        self.start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.end_id
        if self.end_id is None:
            raise InputError("language model: its tokenizer has no eos_token; the prior needs one to end a prompt")

    @classmethod
    def from_pretrained(cls, name: str, device: str | torch.device = "cpu", local_files_only: bool = False) -> "LanguagePrior":
        from transformers import AutoModelForCausalLM, AutoTokenizer  # loaded here, not at import: `--help` must not wait

        path = DEMO_LANGUAGE_MODEL if name == "demo" else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"language_model {name!r}: cannot load it ({reason}). Give a folder or hub id that "
                "AutoModelForCausalLM loads (e.g. gpt2 after `hf download gpt2`), or null for no prior"
            ) from e
        return cls(model, tokenizer, device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _batch(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (N, T) and their mask."""
        width = max(len(row) for row in token_lists)
        ids = torch.full((len(token_lists), width), self.end_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(token_lists):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def nll(self, texts: list[str], ended: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood in nats of each text (with its end token unless `ended` is
        false: the text as the start of a longer one), and the number of tokens summed: (N,), (N,)."""
        rows = [[self.start_id, *self._tokens(text), *([self.end_id] if ended else [])] for text in texts]
        ids, mask = self._batch(rows)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        counted = mask[:, 1:].float()
        return -(logp * counted).sum(1).cpu(), counted.sum(1).cpu()

    def perplexity(self, texts: list[str]) -> torch.Tensor:
        """exp(mean NLL per token) of each text, end token included: (N,)."""
        nll, n = self.nll(texts)
        return torch.exp(nll / n)

    @torch.no_grad()
    def _next_ids(self, rows: list[list[int]], k: int, min_prob: float = 0.0) -> list[list[int]]:
        ids, mask = self._batch(rows)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(rows)), mask.sum(1) - 1].float().softmax(-1)  # (N, V) at each prefix's end
        probs, top = last.topk(min(k, last.shape[-1]), dim=-1)
        return [[i for i, p in zip(row, ps) if p >= min_prob] or row[:1] for row, ps in zip(top.tolist(), probs.tolist())]

    def next_words_or_end(self, prefixes: list[str], k: int, min_prob: float = 0.0) -> list[list[str | None]]:
        """Like next_words, with None where the end token is among the k; words less likely than
        min_prob are left out (the likeliest always stays)."""
        top = self._next_ids([[self.start_id, *self._tokens(prefix)] for prefix in prefixes], k, min_prob)
        out = []
        for row in top:
            words = [None if i == self.end_id else self.tokenizer.decode([i], skip_special_tokens=True).strip() for i in row]
            out.append([w for w in words if w is None or w])
        return out

    def next_words(self, prefixes: list[str], k: int) -> list[list[str]]:
        """The k likeliest next tokens after each prefix, as stripped text (the end and empty ones dropped)."""
        top = self._next_ids([[self.start_id, *self._tokens(prefix)] for prefix in prefixes], k)
        words = []
        for row in top:
            decoded = (self.tokenizer.decode([i], skip_special_tokens=True).strip() for i in row if i != self.end_id)
            words.append([w for w in decoded if w])
        return words

    def complete(self, prefixes: list[str], max_tokens: int) -> list[str]:
        """Greedy continuation of each prefix, at most max_tokens LM tokens, stopped at the end token."""
        rows = [[self.start_id, *self._tokens(prefix)] for prefix in prefixes]
        added: list[list[int]] = [[] for _ in rows]
        open_ = list(range(len(rows)))
        for _ in range(max_tokens):
            if not open_:
                break
            top = self._next_ids([rows[n] + added[n] for n in open_], 1)
            still = []
            for n, (token,) in zip(open_, top):
                if token != self.end_id:
                    added[n].append(token)
                    still.append(n)
            open_ = still
        return [self.tokenizer.decode(extra, skip_special_tokens=True).strip() for extra in added]
