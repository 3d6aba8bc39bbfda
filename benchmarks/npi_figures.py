"""The README's pictures of reconstruction, editing, attention maps, generation and composition.

python benchmarks/npi_figures.py --bench DIR [--reconstruct runs/reconstruct] [--generate runs/generate]
                                 [--compose runs/compose] [--rows 6] [--out runs/figures]

DIR is a `benchmarks/demo_npi.py --out DIR` work folder; the others are the run folders of
`ph2p reconstruct --config configs/reconstruct.yaml`, `ph2p generate --prompts runs/demo/prompts.jsonl
--out runs/generate` and `ph2p compose ... --out runs/compose`. Writes reconstruct.png, attention.png,
generate.png and compose.png to --out: the README's pictures with --out docs, else runs/figures (the
clone's tracked files stay as they are).
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from ph2p_lit.runs import read_jsonl

TILE = 96


def labelled_rows(rows: list[list[Image.Image]], headers: list[str], notes: list[str]) -> Image.Image:
    """Rows of equal tiles under a header line, each row followed by a note."""
    width = TILE * len(headers)
    sheet = Image.new("RGB", (max(width, 560), 18 + len(rows) * (TILE + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, h in enumerate(headers):
        draw.text((k * TILE + 3, 3), h, fill="black")
    for r, (tiles, note) in enumerate(zip(rows, notes)):
        y = 18 + r * (TILE + 16)
        for k, tile in enumerate(tiles):
            sheet.paste(tile.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (k * TILE, y))
        draw.text((3, y + TILE + 2), note[:95], fill="black")
    return sheet


def reconstruction_figure(bench: Path, n: int) -> Image.Image:
    def image(folder: str, image_id: str) -> Image.Image:  # the result file its line names
        (row,) = [r for r in read_jsonl(bench / folder / "reconstructions.jsonl") if r["image_id"] == image_id]
        return Image.open(bench / folder / row["image"])

    edits = {r["image_id"]: r for r in read_jsonl(bench / "edit" / "reconstructions.jsonl")}
    rows, notes = [], []
    for r in sorted(read_jsonl(bench / "rec_prompt_g7.5" / "reconstructions.jsonl"), key=lambda r: r["image_id"])[:n]:
        i = r["image_id"]
        rows.append([Image.open(r["source"]), image("rec_prompt_g7.5", i), image("rec_empty_g7.5", i), image("edit", i)])
        notes.append(f"{r['prompt']}   edit: {edits[i]['prompt']}")
    headers = ["target", "NPI (g 7.5)", "empty neg.", "colour edit"]
    return labelled_rows(rows, headers, notes)


def stacked(paths: list[Path]) -> Image.Image:
    images = [Image.open(p).convert("RGB") for p in paths]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height + 6 for i in images)), "white")
    y = 0
    for i in images:
        sheet.paste(i, (0, y))
        y += i.height + 6
    return sheet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True)
    p.add_argument("--reconstruct", default="runs/reconstruct")
    p.add_argument("--generate", default="runs/generate")
    p.add_argument("--compose", default="runs/compose")
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--out", default="runs/figures")
    args = p.parse_args()
    docs = Path(args.out)
    docs.mkdir(parents=True, exist_ok=True)
    reconstruction_figure(Path(args.bench), args.rows).save(docs / "reconstruct.png")
    stacked(sorted(Path(args.reconstruct, "attention").glob("*.png"))[:4]).save(docs / "attention.png")
    stacked(sorted(Path(args.generate).glob("*.png"))[:4]).save(docs / "generate.png")
    compose = Path(args.compose)
    if compose.is_dir():
        stages = sorted(compose.glob("stage*/generated.png"))
        concepts = sorted((compose / "concepts" / "images").glob("*.png"))
        row = Image.new("RGB", (128 * len(concepts), 128), "white")
        for k, c in enumerate(concepts):
            row.paste(Image.open(c).convert("RGB").resize((128, 128), Image.Resampling.NEAREST), (128 * k, 0))
        row.save(docs / "_concepts.png")
        stacked([docs / "_concepts.png", *stages]).save(docs / "compose.png")
        (docs / "_concepts.png").unlink()
    print(f"wrote {docs}/reconstruct.png, attention.png, generate.png" + (", compose.png" if compose.is_dir() else ""))


if __name__ == "__main__":
    main()
