"""The README's picture of a run's report.html: the page itself, rendered.

pip install -c constraints.txt -e '.[docs]'
python benchmarks/report_figure.py --run runs/demo [--width 1900] [--height 760] [--out docs/report.png]

Run after `make demo` and `ph2p evaluate --config configs/evaluate_demo.yaml`. There is no
browser on our machines to take a screenshot, so MuPDF's HTML engine (PyMuPDF's Story) lays the
page out; the picture is its first screen, width x height CSS pixels.
"""

import argparse
import io
from pathlib import Path

import pymupdf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--width", type=int, default=1900)
    p.add_argument("--height", type=int, default=760)
    p.add_argument("--out", default="docs/report.png")
    args = p.parse_args()
    story = pymupdf.Story(html=(Path(args.run) / "report.html").read_text())
    page = pymupdf.Rect(0, 0, args.width, args.height)
    pdf_bytes = io.BytesIO()
    writer = pymupdf.DocumentWriter(pdf_bytes)
    device = writer.begin_page(page)
    story.place(page + (16, 16, -16, -16))  # the first screen; the rest of the page is not drawn
    story.draw(device)
    writer.end_page()
    writer.close()
    pdf = pymupdf.open("pdf", pdf_bytes.getvalue())
    pdf[0].get_pixmap(dpi=72).save(args.out)
    print(f"{args.out}: the first {args.width} x {args.height} px of {Path(args.run) / 'report.html'}")


if __name__ == "__main__":
    main()
