"""`ph2p app` through Gradio's own client: images in, prompts, generated images, embedding files
and an edit out, from the same API the command uses."""

import pytest
import yaml

gradio_client = pytest.importorskip("gradio_client")

from ph2p_lit.app import PromptApp, build  # noqa: E402
from ph2p_lit.runs import read_jsonl  # noqa: E402


@pytest.fixture()
def page(tmp_path, tiny_model):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"model": tiny_model, "prompt_length": 3, "steps": 3, "max_iter": 1,
                                                "init_prompt": None}}))
    app = PromptApp(config=str(config), run_dir=str(tmp_path / "app"), model=tiny_model, images_per_prompt=1,
                    sample_steps=4)
    served = build(app).queue()
    served.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)  # the first free port from 7860
    yield app, served.local_url
    served.close()


def test_an_image_in_a_prompt_images_and_an_edit_out(page, image_folder, tmp_path):
    app, url = page
    client = gradio_client.Client(url, verbose=False)
    images = [f"{image_folder}/img0.png", f"{image_folder}/img1.png"]
    status, table, files, generated = client.predict([gradio_client.handle_file(p) for p in images],
                                                     api_name="/invert")
    assert status.startswith("done: 2 prompts")
    runs = list((tmp_path / "app" / "runs").iterdir())
    written = read_jsonl(runs[0] / "prompts.jsonl")
    assert [row[1] for row in table["data"]] == [r["prompt"] for r in written if r["image_id"]] != []
    assert [r["steps"] for r in written] == [3, 3]
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)
    assert [g["caption"] for g in generated] == [row[1] for row in table["data"]]
    trace = read_jsonl(next(runs[0].glob("trace.rank*.jsonl")))
    assert [t["step"] for t in trace if t["image_id"] == written[0]["image_id"]] == [1, 2, 3]  # live, each step
    assert all(t["unet_evals"] > 0 for t in trace)

    edited = client.predict("a blue square", api_name="/edit")
    assert len(edited) == 2 and all(e["caption"].endswith("→ a blue square") for e in edited)
    rows = read_jsonl(runs[0] / "edits" / "reconstructions.jsonl")
    assert {r["prompt"] for r in rows} == {"a blue square"}

    # The same images again: found done, nothing inverted twice.
    again = client.predict([gradio_client.handle_file(p) for p in images], api_name="/invert")
    assert [row[1] for row in again[1]["data"]] == [row[1] for row in table["data"]]
    assert len(read_jsonl(runs[0] / "prompts.jsonl")) == 2


def test_no_images_is_a_message_not_a_traceback(page):
    _, url = page
    client = gradio_client.Client(url, verbose=False)
    with pytest.raises(Exception, match="drop one or more images"):
        client.predict([], api_name="/invert")


def test_without_gradio_the_page_says_how_to_install_it(monkeypatch):
    import sys

    from ph2p_lit.errors import InputError

    monkeypatch.setitem(sys.modules, "gradio", None)  # as when the extra is not installed
    with pytest.raises(InputError, match=r"pip install 'ph2p-lit\[app\]'"):
        build(PromptApp())
