"""The real CLIP BPE tokenizer, built offline from the merge list that open_clip ships.

CLIP's vocabulary is fully determined by its merge list: 256 byte symbols, the same with an
end-of-word mark, one token per merge, then <|startoftext|> (49406) and <|endoftext|> (49407).
"""

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the 16e6 list


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def open_clip_bpe_path() -> Path:
    try:
        import open_clip.tokenizer as oct
    except ImportError as e:
        raise SystemExit("building the CLIP tokenizer needs open_clip: pip install open_clip_torch") from e
    return Path(oct.default_bpe())


def build_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json + merges.txt identical to OpenAI CLIP's, and return the tokenizer."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer
