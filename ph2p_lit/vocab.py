"""The projection vocabulary: which tokens a prompt may use, nearest-token projection, decoding.

The embedding table comes from the loaded text encoder (no separate vocabulary file); filters
decide which rows are candidates; special tokens are never candidates.
"""

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InputError

if TYPE_CHECKING:  # the tokenizer comes loaded (Backbone.from_pretrained); `--help` must not wait for transformers
    from transformers import CLIPTokenizer

_WORD_END = "</w>"


def _is_whole_word(token: str) -> bool:
    return token.endswith(_WORD_END)


# CLIP's BPE merges are numbered by frequency in its training text: a word token below this id is
# common in image captions (laptop 10464, selfie 3666), junk like "afcb" or "weathercee" is not
# (44276, 44980).
FREQUENT_BELOW = 20000


@functools.cache
def _dictionary() -> frozenset[str]:
    """Webster's 2nd and GCIDE, lower-case (english-words); modern words come from CLIP's frequency."""
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["web2", "gcide"], lower=True))


@functools.cache
def offensive_words() -> frozenset[str]:
    """The shipped list of words no prompt should contain (ph2p_lit/words/offensive.txt)."""
    lines = (Path(__file__).parent / "words" / "offensive.txt").read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _word(token: str) -> str:
    return token[: -len(_WORD_END)] if token.endswith(_WORD_END) else token


def _is_english_word(token: str, token_id: int) -> bool:
    """A whole word of letters a-z that a dictionary lists or CLIP's captions use often."""
    word = _word(token)
    if not (_is_whole_word(token) and re.fullmatch(r"[a-z]{2,}|a|i", word)):
        return False
    return token_id < FREQUENT_BELOW or _in_dictionary(word)


# Inflections a dictionary lists under their headword: (suffix, what replaces it).
_INFLECTIONS = [("s", ""), ("es", ""), ("ed", ""), ("ed", "e"), ("ing", ""), ("ing", "e"), ("er", ""), ("er", "e"),
                ("ers", ""), ("est", ""), ("ly", ""), ("y", ""), ("ies", "y"), ("ied", "y"), ("ier", "y"),
                ("iest", "y"), ("ily", "y"), ("ness", ""), ("ment", "")]


def _in_dictionary(word: str) -> bool:
    """The word or its headword (merchants, separated, running, happier) is in the dictionary."""
    if word in _dictionary():
        return True
    for suffix, replacement in _INFLECTIONS:
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and len(stem) >= 3:
            if stem + replacement in _dictionary():
                return True
            if suffix in ("ed", "ing", "er", "est") and stem[-1] == stem[-2] and stem[:-1] in _dictionary():
                return True  # a doubled consonant: running, stopped, bigger
    return False


class Vocabulary:
    """Candidate tokens and their embeddings; projects continuous prompts onto them.

    Args:
        tokenizer, embedding_table: the model's; the table is (V, D).
        ascii_only: drop tokens with non-ASCII characters.
        whole_words: keep only tokens that end a word (no sub-word pieces).
        english_words: keep only whole words that a dictionary lists (Webster's
            2nd, GCIDE) or that are frequent in CLIP's captions (implies whole_words).
        deny_offensive: drop the words of the shipped list ph2p_lit/words/offensive.txt.
        allow: if given, only these words (each must be one token).
        deny: words never to use.
        metric: "l2" (the paper's) or "cosine".
    """

    def __init__(
        self,
        tokenizer: "CLIPTokenizer",
        embedding_table: torch.Tensor,
        ascii_only: bool = False,
        whole_words: bool = False,
        english_words: bool = False,
        allow: list[str] | None = None,
        deny: list[str] | None = None,
        metric: str = "l2",
        deny_offensive: bool = True,
    ):
        if metric not in ("l2", "cosine"):
            raise InputError(f"vocabulary metric {metric!r}: use 'l2' or 'cosine'")
        self.tokenizer, self.metric = tokenizer, metric
        tokens = tokenizer.convert_ids_to_tokens(list(range(embedding_table.shape[0])))
        keep = torch.ones(len(tokens), dtype=torch.bool)
        keep[list(set(tokenizer.all_special_ids))] = False
        for i, tok in enumerate(tokens):
            if tok is None or (ascii_only and not tok.isascii()):
                keep[i] = False
            elif (whole_words and not _is_whole_word(tok)) or (english_words and not _is_english_word(tok, i)):
                keep[i] = False
            elif deny_offensive and _word(tok) in offensive_words():
                keep[i] = False
        if allow:
            allowed = torch.zeros_like(keep)
            allowed[self.word_ids(allow)] = True
            keep &= allowed
        if deny:
            keep[self.word_ids(deny)] = False
        self.token_ids = keep.nonzero().squeeze(1)  # (K,)
        if len(self.token_ids) == 0:
            raise InputError("the vocabulary filters leave no token: loosen allow/deny/whole_words/english_words")
        self.table = embedding_table.detach()  # (V, D), the model's own: every token, allowed or not
        self.embeddings = self.table[self.token_ids].float()  # (K, D)
        self._unit = torch.nn.functional.normalize(self.embeddings, dim=-1)
        self._sq_norms = self.embeddings.pow(2).sum(-1)  # (K,)

    def word_ids(self, words: list[str]) -> list[int]:
        ids = []
        for word in words:
            pieces = self.tokenizer(word, add_special_tokens=False).input_ids
            if len(pieces) != 1:
                raise InputError(f"vocabulary word {word!r} is {len(pieces)} tokens; list single-token words")
            ids.append(pieces[0])
        return ids

    def embedding_of(self, token_ids: list[int]) -> torch.Tensor:
        """Embeddings of any tokens of the model's table, (n, D) float."""
        return self.table[torch.tensor(token_ids, device=self.table.device)].float()

    def __len__(self) -> int:
        return len(self.token_ids)

    def to(self, device: torch.device) -> "Vocabulary":
        for name in ("token_ids", "embeddings", "_unit", "_sq_norms"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def scores(self, soft: torch.Tensor) -> torch.Tensor:
        """Similarity of each position to each candidate, larger is nearer: (..., K)."""
        soft = soft.float()
        if self.metric == "cosine":
            return torch.nn.functional.normalize(soft, dim=-1) @ self._unit.T
        # argmin ||e - v||^2 = argmax (2 e.v - ||v||^2): one matmul, no (N, K, D) tensor
        return 2 * soft @ self.embeddings.T - self._sq_norms

    @torch.no_grad()
    def project(self, soft: torch.Tensor, forbid: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest candidate token id per position: (..., D) -> (...,).

        forbid: optional boolean (..., K) mask of candidates a position may not take
        (used for no-repeat prompts).
        """
        scores = self.scores(soft)
        if forbid is not None:
            scores = scores.masked_fill(forbid, float("-inf"))
        return self.token_ids[scores.argmax(-1)]

    @torch.no_grad()
    def project_no_repeat(self, soft: torch.Tensor) -> torch.Tensor:
        """Like `project`, but no token twice in one prompt; (B, L, D) -> (B, L).

        Positions claim tokens greedily, most confident first.
        """
        scores = self.scores(soft)  # (B, L, K)
        B, L, K = scores.shape
        ids = torch.empty(B, L, dtype=torch.long, device=scores.device)
        for b in range(B):
            s = scores[b].clone()
            for _ in range(L):
                flat = s.argmax()
                pos, k = divmod(int(flat), K)
                ids[b, pos] = self.token_ids[k]
                s[pos] = float("-inf")
                s[:, k] = float("-inf")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        """Token ids -> clean text, as the tokenizer decodes (no special tokens, spaces fixed)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
