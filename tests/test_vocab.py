import pytest
import torch

from ph2p_lit.vocab import Vocabulary


@pytest.fixture(scope="module")
def table(tokenizer):
    torch.manual_seed(0)
    return torch.randn(len(tokenizer), 8)


def test_special_tokens_never_candidates(tokenizer, table):
    vocab = Vocabulary(tokenizer, table, deny_offensive=False)
    ids = set(vocab.token_ids.tolist())
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert len(vocab) == len(tokenizer) - 2


def test_l2_projection_is_the_nearest_row(tokenizer, table):
    vocab = Vocabulary(tokenizer, table, whole_words=True)
    soft = torch.randn(3, 5, 8)
    brute = vocab.token_ids[torch.cdist(soft.view(-1, 8), vocab.embeddings).argmin(-1)].view(3, 5)
    assert torch.equal(vocab.project(soft), brute)


def test_cosine_projection(tokenizer, table):
    vocab = Vocabulary(tokenizer, table, metric="cosine")
    soft = table[[320, 736]] * 7.0  # scaled copies of real rows project back onto them
    assert vocab.project(soft).tolist() == [320, 736]


def test_filters(tokenizer, table):
    words = Vocabulary(tokenizer, table, english_words=True)
    tokens = tokenizer.convert_ids_to_tokens(words.token_ids.tolist())
    assert all(t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii() for t in tokens)
    allowed = Vocabulary(tokenizer, table, allow=["red", "star", "blue"], deny=["blue"])
    assert sorted(allowed.token_ids.tolist()) == sorted(tokenizer(["red star"], add_special_tokens=False).input_ids[0])
    with pytest.raises(ValueError, match="single-token"):
        Vocabulary(tokenizer, table, allow=["supercalifragilistic"])
    with pytest.raises(ValueError, match="leave no token"):
        Vocabulary(tokenizer, table, allow=["red"], deny=["red"])


def test_no_repeat_projection_uses_each_token_once(tokenizer, table):
    vocab = Vocabulary(tokenizer, table, allow=["red", "star", "blue", "green"])
    soft = table[[736] * 4][None]  # every position nearest to "red"
    ids = vocab.project_no_repeat(soft)[0].tolist()
    assert len(set(ids)) == 4 and ids.count(736) == 1


def test_decode_is_clean_text(tokenizer, table):
    vocab = Vocabulary(tokenizer, table)
    ids = tokenizer("a red star", add_special_tokens=False).input_ids
    assert vocab.decode(ids) == "a red star"


def test_english_words_are_dictionary_or_frequent_words_and_offensive_ones_never(tokenizer):
    """Junk that is only letters (names run together, hashtags) is not English; inflected and
    modern words are; the shipped offensive list is denied by default."""
    table = torch.randn(len(tokenizer), 8)
    vocab = Vocabulary(tokenizer, table, ascii_only=True, english_words=True)
    kept = {tokenizer.convert_ids_to_tokens(int(i))[: -len("</w>")] for i in vocab.token_ids}
    assert {"laptop", "selfie", "merchants", "separated", "star", "background"} <= kept
    assert not {"nathanfillion", "afcb", "weathercee", "racist"} & kept
    assert "racist" in {tokenizer.convert_ids_to_tokens(int(i))[:-4]
                        for i in Vocabulary(tokenizer, table, deny_offensive=False).token_ids}
