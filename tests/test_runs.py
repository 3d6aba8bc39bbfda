"""The run folder: file names per image id, rank files and their merge, the finished set."""

import pytest

from ph2p_lit.errors import InputError
from ph2p_lit.runs import RunFolder, file_name


def test_every_image_id_gets_its_own_file_name():
    ids = ["a.png", "a.jpg", "sub/b.png", "sub__b.png", "a_/b.png", "a/_b.png", "a/b~1.png", ".hidden.png",
           "x" * 300 + ".png", "x" * 300 + ".jpg", "deep/er/c.png", "deep__er/c.png"]
    names = [file_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all("/" not in n and len(n.encode()) <= 255 and not n.startswith(".") for n in names)
    # Plain ids keep a readable name: the id itself, folders joined by "__".
    assert names[:3] == ["a.png", "a.jpg", "sub__b.png"]


def test_rows_see_every_ranks_lines_before_and_after_the_merge(tmp_path):
    run = RunFolder(tmp_path)
    run.append("prompts", {"image_id": "b.png", "prompt": "b"}, rank=0)
    run.append("prompts", {"image_id": "a.png", "prompt": "a"}, rank=1)
    assert sorted(r["image_id"] for r in run.rows("prompts")) == ["a.png", "b.png"]
    run.merge("prompts")
    assert not list(tmp_path.glob("prompts.rank*.jsonl"))
    assert [r["image_id"] for r in run.rows("prompts")] == ["a.png", "b.png"]  # sorted, one file
    assert run.done_keys("prompts") == {("a.png", None), ("b.png", None)}


def test_a_line_without_image_id_is_named(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(InputError, match="prompts.jsonl: a line without image_id"):
        RunFolder(tmp_path).rows("prompts")
