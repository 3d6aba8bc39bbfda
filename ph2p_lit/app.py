"""`ph2p app`: a web page to drop images on and get their prompts, images generated from them, the
textual-inversion files and an NPI edit (Gradio). Every result comes from the Python API
(`invert`, `reconstruct`) and `generate`, so the page runs exactly what the command runs.

    pip install 'ph2p-lit[app]'; ph2p app            # http://127.0.0.1:7860, the demo model
"""

import hashlib
import inspect
import shutil
import threading
import time
from pathlib import Path

from .api import invert, reconstruct
from .errors import InputError
from .generate import generate_grids
from .runs import RunFolder, read_jsonl

TRACE_EVERY = 1  # the page shows the prompt after every optimiser step


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise InputError("the app needs Gradio: pip install 'ph2p-lit[app]'") from None
    return gr


class PromptApp:
    """What the page does, apart from the page: store the dropped images under their content
    hash (a re-dropped set is found done), invert them in a run folder of their own while the
    page reads its trace, then generate from and edit the prompts."""

    def __init__(self, config: str = "demo", run_dir: str = "runs/app", model: str | None = None,
                 steps: int | None = None, images_per_prompt: int = 3, sample_steps: int = 50,
                 edit_config: str = "reconstruct", images: list[str] | None = None):
        self.config, self.root, self.edit_config = config, Path(run_dir), edit_config
        self.images = [str(p) for p in images or []]  # shown with their results when the page opens
        self.model, self.steps = model, steps  # None: the config's
        self.images_per_prompt, self.sample_steps = images_per_prompt, sample_steps

    def store(self, files: list[str]) -> tuple[list[Path], Path]:
        """Copy the uploads under their content hash; the run folder is named by the set."""
        if not files:
            raise InputError("drop one or more images first")
        inputs = self.root / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        paths = []
        for f in files:
            data = Path(f).read_bytes()
            path = inputs / f"{hashlib.sha1(data).hexdigest()[:16]}{Path(f).suffix.lower() or '.png'}"
            if not path.is_file():
                shutil.copyfile(f, path)
            paths.append(path)
        key = hashlib.sha1("".join(sorted(p.name for p in paths)).encode()).hexdigest()[:12]
        return paths, self.root / "runs" / key

    def invert(self, files: list[str]):
        """Yields (status, rows | None): the current prompt of each image while it is searched,
        then the finished lines of prompts.jsonl, one per dropped image in order."""
        paths, run = self.store(files)
        done = {row.get("source"): row for row in RunFolder(run).rows("prompts")}
        if all(str(p) in done for p in paths):  # a set dropped before: no model to load
            yield f"done: {len(paths)} prompts in {run / 'prompts.jsonl'}", [done[str(p)] for p in paths]
            return
        result, error = [], []

        def work():
            try:
                settings = {k: v for k, v in (("model", self.model), ("steps", self.steps)) if v is not None}
                result.extend(invert(paths, config=self.config, run_dir=run, model=settings,
                                     trainer={"enable_progress_bar": False, "callbacks": [
                                         {"class_path": "ph2p_lit.callbacks.PromptLogger",
                                          "init_args": {"every_n_steps": TRACE_EVERY}}]}))
            except Exception as e:  # shown on the page: the one-line InputError or the bug's type
                error.append(e)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            yield self.status(run), None
        if error:
            raise error[0]
        yield f"done: {len(result)} prompts in {run / 'prompts.jsonl'}", result

    @staticmethod
    def status(run: Path) -> str:
        """The newest traced prompt of each image: step, loss, U-Net evaluations."""
        latest = {}
        for path in sorted(run.glob("trace.rank*.jsonl")):
            for row in read_jsonl(path):
                latest[row["image_id"]] = row
        if not latest:
            return "loading the model ..."
        return "\n".join(f"step {r['step']}: {r['prompt']}  (loss {r['loss']:.4f}, "
                         f"{r.get('unet_evals', '?')} U-Net evaluations)" for r in latest.values())

    def generated(self, rows: list[dict]) -> list[tuple[str, str]]:
        """Images generated from each prompt, by the same code as `ph2p generate`."""
        out = self.run_of(rows) / "generated"
        listing = out / "generated.jsonl"
        grids = {r["prompt"]: out / r["grid"] for r in read_jsonl(listing)} if listing.is_file() else {}
        if any(r["prompt"] not in grids for r in rows):  # else every grid is there: no model to load
            generate_grids([r["prompt"] for r in rows], out=str(out), images_per_prompt=self.images_per_prompt,
                           model=self.model or "demo", steps=self.sample_steps)
            grids = {r["prompt"]: out / r["grid"] for r in read_jsonl(listing)}
        return [(str(grids[r["prompt"]]), r["prompt"]) for r in rows if r["prompt"] in grids]

    def embeddings(self, rows: list[dict]) -> list[str]:
        run = self.run_of(rows)
        return [str(run / r["embedding"]) for r in rows if r.get("embedding")]

    def edit(self, rows: list[dict], edit: str) -> list[tuple[str, str]]:
        """Each image rebuilt with its prompt edited ("red->blue"), by negative-prompt inversion."""
        if not rows:
            raise InputError("find the prompts first")
        if not edit.strip():
            raise InputError('write an edit, e.g. "red->blue" or a whole new prompt')
        run = self.run_of(rows)
        model = {"edit": edit.strip(), "attention_maps": False, "steps": self.sample_steps,
                 **({"model": self.model} if self.model else {})}
        done = reconstruct(run / "prompts.jsonl", config=self.edit_config, run_dir=run / "edits", model=model,
                           trainer={"enable_progress_bar": False})
        return [(str(run / "edits" / r["image"]), f"{r['source_prompt']} → {r['prompt']}") for r in done]

    def run_of(self, rows: list[dict]) -> Path:
        return self.store([r["source"] for r in rows])[1]


def build(app: PromptApp):
    """The page: images in; live prompt, prompts, generated images, embedding files, an edit out."""
    gr = _gradio()
    with gr.Blocks(title="ph2p: prompts from images", analytics_enabled=False) as page:
        gr.Markdown("# Prompts from images\nDrop images; the prompt that makes each is searched by "
                    "inverting the model (PH2P), then images are generated from it.")
        rows = gr.State([])
        with gr.Row():
            with gr.Column():
                images = gr.File(value=app.images or None, label="images", file_count="multiple",
                                 file_types=["image"])
                go = gr.Button("find the prompts", variant="primary")
                live = gr.Textbox(label="search (current prompt of each image)", lines=3)
            with gr.Column():
                prompts = gr.Dataframe(headers=["image", "prompt", "loss", "U-Net evals"], label="prompts", wrap=True)
                files = gr.File(label="textual-inversion files (pipe.load_textual_inversion)", file_count="multiple")
        generated = gr.Gallery(label="generated from each prompt", columns=4, height=320, object_fit="contain")
        with gr.Row():
            edit = gr.Textbox(label='edit ("red->blue", or a whole prompt)')
            do_edit = gr.Button("edit the images")
        edited = gr.Gallery(label="edited (negative-prompt inversion)", columns=6, height=240, object_fit="contain")

        def find(paths):
            for status, found in app.invert(paths or []):
                if found is None:
                    yield status, gr.skip(), gr.skip(), gr.skip(), gr.skip()
                else:
                    # one line per dropped image, in order: named as the user named it
                    table = [[Path(p).name, r["prompt"], round(r["best_loss"], 4), r["unet_evals"]] if "prompt" in r
                             else [Path(p).name, f"not read: {r.get('error', '')}", None, None]
                             for p, r in zip(paths, found)]
                    found = [r for r in found if "prompt" in r]  # an unreadable file has its reason only
                    yield status, table, app.embeddings(found), app.generated(found), found

        outputs = [live, prompts, files, generated, rows]
        go.click(_shown(gr, find), [images], outputs, api_name="invert")
        if app.images:
            def preload():
                yield from find(app.images)
            page.load(_shown(gr, preload), None, outputs)
        do_edit.click(_shown(gr, app.edit), [rows, edit], [edited], api_name="edit")
    return page


def _shown(gr, fn):
    """An InputError as a message on the page, not a stack trace in the terminal."""
    if inspect.isgeneratorfunction(fn):
        def generator(*args):
            try:
                yield from fn(*args)
            except InputError as e:
                raise gr.Error(str(e)) from None
        return generator

    def call(*args):
        try:
            return fn(*args)
        except InputError as e:
            raise gr.Error(str(e)) from None
    return call


def app(config: str = "demo", model: str | None = None, run_dir: str = "runs/app", steps: int | None = None,
        images: list[str] | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serve the page until interrupted.

    Args:
        config: the invert config (a file, or demo / sd15 / sd21 / sdxl).
        model: a diffusers model folder or hub id instead of the config's.
        run_dir: where dropped images and their runs are kept (a re-dropped set is not redone).
        steps: optimiser steps per image instead of the config's.
        images: images to invert and show when the page opens (before anything is dropped).
        host, port: where to serve; 0.0.0.0 to reach it from other machines.
        share: a public Gradio link.
    """
    page = build(PromptApp(config, run_dir, model, steps, images=images))
    page.queue().launch(server_name=host, server_port=port, share=share)
    while True:  # launch returns at once when run from a script that is not interactive
        time.sleep(3600)
