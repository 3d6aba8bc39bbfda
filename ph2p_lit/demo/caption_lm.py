"""The demo world's language model: a tiny GPT-2 trained on the world's captions.

It plays GPT-2's part for the demo model: it knows the world's caption grammar ("a {colour}
{shape} on a {background} background", with optional size and position) as GPT-2 knows English,
and nothing else: every other word is one unknown token it has never seen, so it finds it
unlikely. Word-level tokenizer, 2 layers, about 60 k parameters; saved as transformers saves a
model, so `AutoModelForCausalLM.from_pretrained` loads it like any other.

    ph2p train-caption-lm --out runs/caption_lm   # the shipped one: --out ph2p_lit/demo/language_model
"""

import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .world import sample_scene, world_words

END, UNKNOWN = "<|endoftext|>", "[UNK]"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {END: 0, UNKNOWN: 1, **{w: i + 2 for i, w in enumerate(world_words())}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=END, eos_token=END, pad_token=END,
                                   unk_token=UNKNOWN)


def caption_batch(tokenizer, rng: np.random.Generator, n: int) -> torch.Tensor:
    """n captions of random scenes as END + words + END, right-padded with END: (n, T)."""
    rows = [[tokenizer.eos_token_id, *tokenizer(sample_scene(rng).caption).input_ids, tokenizer.eos_token_id]
            for _ in range(n)]
    width = max(map(len, rows))
    return torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in rows])


def train_caption_lm(out: str = "runs/caption_lm", steps: int = 1500, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0) -> dict:
    """Train the caption language model and save it (model and tokenizer) to `out`.

    Args:
        out: folder to write; it is created.
        steps: AdamW steps, each on freshly sampled captions.
        batch_size: captions per step.
        lr: AdamW's learning rate.
        seed: the caption stream and the initial weights.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    started = time.perf_counter()
    for step in range(steps):
        ids = caption_batch(tokenizer, rng, batch_size)
        # Padding ENDs after the first closing END are not targets: only the caption and its end.
        labels = ids.clone()
        ends = (ids == tokenizer.eos_token_id).cumsum(1)
        labels[ends > 2] = -100
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"steps": steps, "final_loss": loss.item(), "seconds": round(time.perf_counter() - started, 1),
              "parameters": sum(p.numel() for p in model.parameters())}
    print(f"saved to {out}: {report}")
    return report
