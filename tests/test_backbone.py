import pytest
import torch

from ph2p_lit.backbone import Backbone
from ph2p_lit.errors import InputError


@pytest.fixture(scope="module")
def backbone(tiny_model):
    return Backbone.from_pretrained(tiny_model, local_files_only=True)


def test_embedding_path_equals_input_ids_path(backbone):
    ids = backbone.tokenize(["a red star on a white background", "two dogs", ""])
    via_ids = backbone.text_encoder(ids).last_hidden_state
    via_embeddings = backbone.encode_embeddings(backbone.token_table[ids])
    assert torch.equal(via_ids, via_embeddings)


def test_embedding_path_is_causal(backbone):
    ids = backbone.tokenize(["a red star"])
    embeds = backbone.token_table[ids]
    changed = embeds.clone()
    changed[0, 5] += 1.0  # a later position must not change earlier outputs
    a, b = backbone.encode_embeddings(embeds), backbone.encode_embeddings(changed)
    assert torch.equal(a[0, :5], b[0, :5]) and not torch.equal(a[0, 5:], b[0, 5:])


def test_frozen_and_shapes(backbone):
    assert all(not p.requires_grad for m in (backbone.unet, backbone.vae, backbone.text_encoder) for p in m.parameters())
    assert backbone.max_length == 16 and backbone.resolution == 16
    latents = backbone.encode_images(torch.zeros(2, 3, 16, 16))
    assert latents.shape == (2, *backbone.latent_shape)


def test_v_prediction_target_read_from_scheduler(backbone):
    x, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    assert torch.equal(backbone.target(x, eps, t), eps)
    backbone.scheduler.register_to_config(prediction_type="v_prediction")
    try:
        a = backbone.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        assert torch.allclose(backbone.target(x, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x)
    finally:
        backbone.scheduler.register_to_config(prediction_type="epsilon")


def test_missing_model_folder_says_what_is_expected(tmp_path):
    with pytest.raises(InputError, match="no diffusers pipeline folder"):
        Backbone.from_pretrained(str(tmp_path / "nowhere"))


def test_gradient_checkpointing_gives_the_same_gradient_to_the_prompt(tiny_model):
    """The memory tier recomputes the U-Net's activations in the backward pass: same gradient."""
    grads = []
    for checkpointing in (False, True):
        backbone = Backbone.from_pretrained(tiny_model, local_files_only=True, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        embeds = backbone.token_table[backbone.tokenize(["a red star", "two dogs"])].clone().requires_grad_(True)
        latents = torch.randn(2, *backbone.latent_shape)
        loss = backbone.diffusion_loss(latents, torch.randn_like(latents), torch.tensor([300, 700]),
                                       backbone.encode_embeddings(embeds))
        grads.append(torch.autograd.grad(loss.sum(), embeds)[0])
    assert backbone.unet.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])
