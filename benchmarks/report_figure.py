"""The README's picture of a run's report.html, drawn from the files the page is built from.

python benchmarks/report_figure.py --run runs/demo [--rows 4] [--out docs/report.png]

Run after `make demo` and `ph2p evaluate --config configs/evaluate_demo.yaml`. There is no
browser on our machines to screenshot the page, so this draws the same table (target, prompt,
report/<image>.png, caption, loss and the evaluate measures) with PIL.
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ph2p_lit.callbacks import read_jsonl

ROW, TARGET = 104, 96
MEASURES = ("lpips_to_target", "oracle_similarity", "word_f1", "oracle_agreement")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--out", default="docs/report.png")
    args = p.parse_args()
    run = Path(args.run)
    rows = sorted(read_jsonl(run / "prompts.jsonl"), key=lambda r: r["image_id"])[: args.rows]
    metrics = {m["image_id"]: m for m in read_jsonl(run / "metrics.jsonl")} if (run / "metrics.jsonl").is_file() else {}
    font, bold = ImageFont.load_default(13), ImageFont.load_default(15)
    columns = [("target", 110), ("recovered prompt", 340), ("generated from it", 310), ("caption", 300),
               ("best loss", 80)] + [(m, 130) for m in MEASURES if metrics]
    width = sum(w for _, w in columns) + 20
    sheet = Image.new("RGB", (width, 60 + ROW * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), f"ph2p run {run.name}  (report.html, {len(read_jsonl(run / 'prompts.jsonl'))} images)",
              font=bold, fill="black")
    x = 10
    for name, w in columns:
        draw.text((x, 36), name, font=font, fill="black")
        x += w
    for i, row in enumerate(rows):
        y = 56 + i * ROW
        draw.line((10, y, width - 10, y), fill="#ddd")
        stem = row["image_id"].replace("/", "__").rsplit(".", 1)[0]
        cells = [Image.open(row["source"]).convert("RGB").resize((TARGET, TARGET), Image.Resampling.NEAREST),
                 row["prompt"], Image.open(run / "report" / f"{stem}.png").convert("RGB"),
                 row.get("caption", ""), f"{row['best_loss']:.4f}"]
        cells += [f"{metrics[row['image_id']][m]:.3f}" for m in MEASURES if metrics]
        x = 10
        for (_, w), cell in zip(columns, cells):
            if isinstance(cell, Image.Image):
                scale = TARGET / cell.height
                sheet.paste(cell.resize((int(cell.width * scale), TARGET), Image.Resampling.NEAREST), (x, y + 4))
            else:
                draw.text((x, y + ROW // 2 - 8), cell, font=font, fill="black")
            x += w
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
