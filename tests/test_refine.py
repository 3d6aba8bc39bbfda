"""The discrete refinement (greedy swaps, guided decoding, pruning) and the language prior, on toy
objectives whose optimum is known, and on the tiny model end to end."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ph2p_lit.demo.caption_lm import build_tokenizer
from ph2p_lit.demo.world import world_words
from ph2p_lit.errors import InputError
from ph2p_lit.language_prior import LanguagePrior
from ph2p_lit.refine import PromptSearch, Refinement
from ph2p_lit.vocab import Vocabulary


@pytest.fixture(scope="module")
def world_vocab(tokenizer) -> Vocabulary:
    """The demo tokenizer's table restricted to the demo world's words (one CLIP token each)."""
    torch.manual_seed(0)
    table = torch.randn(len(tokenizer), 16)
    return Vocabulary(tokenizer, table, allow=world_words())


@pytest.fixture(scope="module")
def demo_prior() -> LanguagePrior:
    return LanguagePrior.from_pretrained("demo")


def _ids(vocab, text):
    return vocab.tokenizer(text, add_special_tokens=False).input_ids


def _toy(vocab, loss_of_words):
    """objective(rows) = loss_of_words(list of words); no gradient information (zeros)."""

    def objective(rows, owners, draws):
        return torch.tensor([loss_of_words(vocab.decode(r).split()) for r in rows])

    def gradient(rows, owners, draws):
        return [torch.zeros(len(r), vocab.embeddings.shape[1]) for r in rows]

    return objective, gradient


def _every_option(vocab, **kw) -> Refinement:
    n = len(vocab)
    base = dict(draws=4, screen_draws=2, top_k=n, nearest_k=0, prior_k=8, per_position=n, finalists=n,
                budget=10**6, beams=0, prune_tolerance=None, min_gain=0.0)
    return Refinement(**{**base, **kw})


def test_swaps_reach_the_target_from_any_start(world_vocab):
    target = "a red star on a white background".split()
    objective, gradient = _toy(world_vocab, lambda words: sum(w != t for w, t in zip(words, target)) + abs(len(words) - 7))
    search = PromptSearch(objective, gradient, world_vocab, _every_option(world_vocab))
    start = _ids(world_vocab, "blue circle circle the pink gray small")
    (out,) = search.run([start])
    assert world_vocab.decode(out.ids) == " ".join(target)
    assert out.objective == 0 and out.swaps == 7  # one position a round
    assert out.start_objective == 7 and out.history == [6, 5, 4, 3, 2, 1, 0]


def test_the_first_order_ranking_proposes_the_token_that_lowers_a_linear_loss(world_vocab):
    """With loss = sum_i e_i . c, the GCG estimate g_i . (e_v - e_i) is exact: its top-1 option is
    the vocabulary row with the smallest e . c, and one swap per position reaches the optimum."""
    c = torch.randn(world_vocab.embeddings.shape[1])

    def objective(rows, owners, draws):
        return torch.stack([world_vocab.embedding_of(r).sum(0) @ c for r in rows])

    def gradient(rows, owners, draws):
        return [c.expand(len(r), -1) for r in rows]

    settings = Refinement(draws=2, screen_draws=1, top_k=1, nearest_k=0, prior_k=0, per_position=1, finalists=4,
                          budget=10**6, beams=0, prune_tolerance=None, min_gain=0.0)
    (out,) = PromptSearch(objective, gradient, world_vocab, settings).run([_ids(world_vocab, "red star white")])
    best = int(world_vocab.token_ids[(world_vocab.embeddings @ c).argmin()])
    assert out.ids == [best, best, best]


def test_pruning_keeps_the_shortest_prompt_within_tolerance(world_vocab):
    """Fillers cost 0.1% each to delete, content words 50%: the fillers go, the content stays,
    and the unpruned prompt is kept."""
    content = {"red", "star", "white"}

    def loss(words):
        return 1.0 + 0.5 * len(content - set(words)) + 0.001 * (7 - len(words))

    objective, gradient = _toy(world_vocab, loss)
    settings = _every_option(world_vocab, top_k=0, per_position=0, prune_tolerance=0.01)
    start = _ids(world_vocab, "a red star on a white background")
    (out,) = PromptSearch(objective, gradient, world_vocab, settings).run([start])
    assert world_vocab.decode(out.ids) == "red star white"
    assert out.unpruned_ids == start and out.deletions == 4
    # A tolerance below one filler's cost deletes nothing.
    settings = _every_option(world_vocab, top_k=0, per_position=0, prune_tolerance=0.0005)
    (out,) = PromptSearch(objective, gradient, world_vocab, settings).run([start])
    assert out.ids == start


def test_without_a_prior_hedges_win_and_with_one_the_caption_does(world_vocab, demo_prior):
    """The failure the prior exists for: a loss that rewards naming more values (hedging) a
    little prefers a list of words; weighted against the caption model's NLL it prefers the caption."""
    truth = {"red", "star", "white"}
    hedges = {"blue", "circle", "gray", "green", "square", "black"}

    def loss(words):
        named = set(words)
        return 0.1 - 0.01 * len(truth & named) - 0.0005 * len(hedges & named) + 0.0005 * abs(len(words) - 7)

    objective, gradient = _toy(world_vocab, loss)
    start = _ids(world_vocab, "a red star on a white background")
    (alone,) = PromptSearch(objective, gradient, world_vocab, _every_option(world_vocab)).run([start])
    assert len(set(world_vocab.decode(alone.ids).split()) & hedges) >= 2

    settings = _every_option(world_vocab, prior_weight=5e-4, beams=4)
    (guided,) = PromptSearch(objective, gradient, world_vocab, settings, demo_prior, max_decode_length=14).run(
        [_ids(world_vocab, "blue circle gray green square black pink")])
    words = world_vocab.decode(guided.ids).split()
    assert truth <= set(words) and not hedges & set(words)
    assert guided.prior_nll < 10  # a caption, as the world writes them


def test_min_gain_takes_corrections_and_refuses_hedges(world_vocab):
    """Putting the true word in place of a wrong one gains 10% of the loss, adding a hedge 0.5%:
    with min_gain 2% only the correction is taken."""
    truth, hedges = {"red", "star", "white"}, {"blue", "circle", "gray", "green", "square", "black"}

    def loss(words):
        named = set(words)
        return 0.1 - 0.01 * len(truth & named) - 0.0005 * len(hedges & named)

    objective, gradient = _toy(world_vocab, loss)
    start = _ids(world_vocab, "a red heart on a white background")
    (out,) = PromptSearch(objective, gradient, world_vocab, _every_option(world_vocab, min_gain=0.02)).run([start])
    words = set(world_vocab.decode(out.ids).split())
    assert truth <= words and not words & hedges
    (greedy,) = PromptSearch(objective, gradient, world_vocab, _every_option(world_vocab)).run([start])
    assert set(world_vocab.decode(greedy.ids).split()) & hedges  # with no margin the hedges come in


def test_budget_bounds_the_search(world_vocab):
    target = "a red star on a white background".split()
    objective, gradient = _toy(world_vocab, lambda words: sum(w != t for w, t in zip(words, target)))
    settings = _every_option(world_vocab, budget=2000)
    search = PromptSearch(objective, gradient, world_vocab, settings)
    (out,) = search.run([_ids(world_vocab, "blue circle circle the pink gray small")])
    assert out.evaluations <= 2000 and out.rounds < 6


def test_no_repeat_refinement_never_repeats_a_token(world_vocab):
    objective, gradient = _toy(world_vocab, lambda words: -sum(w == "red" for w in words))
    search = PromptSearch(objective, gradient, world_vocab, _every_option(world_vocab), no_repeat=True)
    (out,) = search.run([_ids(world_vocab, "blue circle gray")])
    assert len(set(out.ids)) == len(out.ids) and "red" in world_vocab.decode(out.ids).split()


# ---- the language prior ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A tiny randomly initialised GPT-2 and a tokenizer, saved as transformers saves them."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_prior_nll_is_the_sum_of_token_log_probabilities(tiny_gpt2):
    prior = LanguagePrior.from_pretrained(tiny_gpt2, local_files_only=True)
    texts = ["a red star", "a blue circle on a white background"]
    nll, counted = prior.nll(texts)
    for text, value, n in zip(texts, nll, counted):
        ids = torch.tensor([[prior.start_id, *prior.tokenizer(text).input_ids, prior.end_id]])
        logp = torch.log_softmax(prior.model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])
        assert math.isclose(float(value), float(-logp.sum()), rel_tol=1e-5)
        assert int(n) == ids.shape[1] - 1
    assert torch.allclose(prior.perplexity(texts), torch.exp(nll / counted))
    unended, _ = prior.nll(texts, ended=False)
    assert (unended < nll).all()  # the end token costs something


def test_prior_that_does_not_load_is_one_line_naming_it(tmp_path):
    with pytest.raises(InputError, match="language_model .*no_such_lm.*cannot load it") as e:
        LanguagePrior.from_pretrained(str(tmp_path / "no_such_lm"), local_files_only=True)
    assert "\n" not in str(e.value)


def test_shipped_caption_model_prefers_captions_to_hedges_and_junk(demo_prior):
    nll, _ = demo_prior.nll(["a red star on a white background", "circle red heart square purple orange small",
                             "candles red candles weathercee alin black star", "a red red star on a white background"])
    assert nll[0] < 8 and nll[0] + 10 < nll[3] and nll[3] + 10 < min(nll[1], nll[2])
    assert demo_prior.complete(["a red star on a"], 5)[0].endswith("background")
