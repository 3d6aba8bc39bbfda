import pytest
import torch

from ph2p_lit.sampler import TimestepSampler

SHAPE = (4, 8, 8)


def test_window_and_determinism_per_image():
    a, b = TimestepSampler(500, 900, draws=64, seed=3), TimestepSampler(500, 900, draws=64, seed=3)
    t, noise = a.next("img1", SHAPE)
    assert t.min() >= 500 and t.max() <= 899 and noise.shape == (64, *SHAPE)
    b.next("other", SHAPE)  # another image's draws in between change nothing for img1
    t2, noise2 = b.next("img1", SHAPE)
    assert torch.equal(t, t2) and torch.equal(noise, noise2)
    t3, _ = a.next("img1", SHAPE)
    assert not torch.equal(t, t3)  # the stream moves on


def test_state_dict_resumes_the_stream():
    a = TimestepSampler(seed=1)
    for _ in range(5):
        a.next("x", SHAPE)
    b = TimestepSampler(seed=1)
    b.load_state_dict(a.state_dict())
    ta, na = a.next("x", SHAPE)
    tb, nb = b.next("x", SHAPE)
    assert torch.equal(ta, tb) and torch.equal(na, nb)


def test_fixed_set_spans_window_and_never_changes():
    s = TimestepSampler(100, 500, eval_draws=5, seed=0)
    t, noise = s.fixed("x", SHAPE)
    s.next("x", SHAPE)
    t2, noise2 = s.fixed("x", SHAPE)
    assert t.tolist() == [100, 200, 300, 399, 499]
    assert torch.equal(noise, noise2)


def test_empty_window_is_refused():
    with pytest.raises(ValueError, match="window"):
        TimestepSampler(900, 500)
