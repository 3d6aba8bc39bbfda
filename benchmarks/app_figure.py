"""The README's picture of `ph2p app`: the page opened on four bundled demo renders, their prompts
found and images generated from them, as a real browser (headless Chromium) shows it.

    python benchmarks/app_figure.py [--out docs/app.png]     # needs chromium (apt-get install chromium)
"""

import argparse
import shutil
import subprocess
from pathlib import Path

from ph2p_lit.app import PromptApp, build
from ph2p_lit.images import DEMO_IMAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/figures/app.png")
    parser.add_argument("--run_dir", default="runs/app_figure")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("app_figure: needs chromium (apt-get install chromium)")
    images = sorted(str(p) for p in Path(DEMO_IMAGES).glob("*.png"))[: args.images]
    app = PromptApp(config="demo", run_dir=args.run_dir, images=images)
    for status, rows in app.invert(images):  # find the prompts first: the page then opens on them
        pass
    app.generated(rows)
    page = build(app).queue()
    page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)  # the first free port from 7860
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--screenshot={Path(args.out).resolve()}", "--window-size=1400,1250",
                    "--virtual-time-budget=20000", page.local_url],
                   check=True, capture_output=True, timeout=300)
    page.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
