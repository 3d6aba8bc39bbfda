import numpy as np
import pytest

from ph2p_lit.demo import world
from ph2p_lit.demo.evaluate import prompt_scores

SENTENCES = [
    "a large red circle on a blue background",
    "A photo of bus of color .",
    "Hello, World! it's 3:45pm — naïve café",
    "   multiple   spaces\tand\nnewlines ",
    "emoji 🙂 and CamelCaseWords and snake_case",
]


def test_tokenizer_matches_clip(tokenizer):
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.tokenizer.SimpleTokenizer()
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    for sentence in SENTENCES:
        assert tokenizer(sentence, add_special_tokens=False).input_ids == reference.encode(sentence), sentence


def test_every_world_word_is_one_token(tokenizer):
    for values in world.ATTRIBUTE_VALUES.values():
        for word in values:
            assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = max(len(tokenizer(t.format(colour="yellow", shape="triangle", background="black", size="small",
                                         position="center")).input_ids) for t in world.TEMPLATES)
    assert longest <= tokenizer.model_max_length


def test_renders_are_seeded_and_drawn_as_captioned():
    a, scenes = world.make_renders(6, seed=5)
    b, _ = world.make_renders(6, seed=5)
    assert np.array_equal(a, b) and a.shape == (6, 32, 32, 3)
    for image, scene in zip(a, scenes):
        corner = image[0, 0].astype(int)
        assert np.abs(corner - world.BACKGROUNDS[scene.background]).max() < 30  # background in the corner


def test_imagefolder_export(tmp_path):
    import json

    root = world.export_imagefolder(tmp_path / "f", 3, seed=1)
    rows = [json.loads(l) for l in (root / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all((root / r["file_name"]).is_file() and r["text"] for r in rows)


def test_exact_score_refuses_prompts_that_list_every_value():
    truth = {"colour": "red", "shape": "square", "background": "white"}
    listing = prompt_scores("star orange red square pink white purple", truth)
    assert all(listing[a]["present"] and not listing[a]["exact"] for a in truth)
    clean = prompt_scores("red square on white", truth)
    assert all(clean[a]["exact"] for a in truth)


def test_token_shares_count_junk_and_repeats_as_the_issue_defines_them():
    from ph2p_lit.demo.evaluate import token_shares

    assert token_shares("dust star dust blue caucus white prize") == {"tokens": 7, "junk": 4, "repeats": 1, "content_repeats": 1}
    # A caption repeats "a" as captions do; that is no content repeat.
    assert token_shares("a red star on a white background") == {"tokens": 7, "junk": 0, "repeats": 1, "content_repeats": 0}
