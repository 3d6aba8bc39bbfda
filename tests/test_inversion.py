from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from ph2p_lit.callbacks import PromptLogger, ResultsWriter
from ph2p_lit.data import ImageDataModule
from ph2p_lit.errors import InputError
from ph2p_lit.inversion import PromptInversion
from ph2p_lit.optim import BatchedLBFGS
from ph2p_lit.runs import read_jsonl


def _module(tiny_model, **kw):
    args = dict(model=tiny_model, prompt_length=4, steps=3, max_iter=2, local_files_only=True, init_prompt=None)
    return PromptInversion(**{**args, **kw})


def _fit(module, image_folder, tmp_path, callbacks=(), limit=None, **trainer_kw):
    data = ImageDataModule(root=image_folder, batch_size=module.hparams.batch_size or 1, limit=limit)
    kw = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=list(callbacks), **{**kw, **trainer_kw})
    trainer.fit(module, datamodule=data)
    return trainer


def test_only_the_soft_prompt_is_a_parameter(tiny_model):
    module = _module(tiny_model, batch_size=2)
    module.setup("fit")
    assert [name for name, _ in module.named_parameters()] == ["soft_prompt"]
    assert list(module.state_dict()) == ["soft_prompt"]
    assert module.soft_prompt.shape == (2, 4, module.backbone.token_table.shape[1])


def test_prompt_length_is_checked_against_the_tokenizer(tiny_model):
    for bad in (0, 15):  # the tiny tokenizer's 16 positions leave 1..14 free
        with pytest.raises(ValueError, match="prompt_length"):
            _module(tiny_model, prompt_length=bad).setup("fit")


@pytest.mark.parametrize("optimizer", ["ph2p", "lbfgs"])
def test_closure_runs_max_iter_times_per_step(tiny_model, image_folder, tmp_path, optimizer):
    module = _module(tiny_model, optimizer=optimizer, steps=2, max_iter=4, max_step=None)
    with mock.patch.object(module, "prompt_losses", wraps=module.prompt_losses) as losses:
        trainer = _fit(module, image_folder, tmp_path, limit=1)
    # 2 steps x 4 closure evaluations; scoring for results adds none (it is not in the closure).
    # L-BFGS may stop a step early, as torch's does, when the loss stops changing (here: when
    # the projection did not move, so the loss at it is the same to the bit).
    closure_calls = [c for c in losses.call_args_list if c.args[0].requires_grad]
    if optimizer == "ph2p":
        assert len(closure_calls) == 2 * 4
    else:
        assert 2 <= len(closure_calls) <= 2 * 4
    assert trainer.global_step == 2  # Lightning counts optimiser steps, not evaluations


def test_ph2p_update_is_lr_times_the_gradient_at_the_projection(tiny_model, image_folder, tmp_path):
    """The authors' rule: ê ← ê − lr · ∇L(ẽ), ẽ = Proj(ê), after every evaluation."""
    module = _module(tiny_model, steps=1, max_iter=2, lr=3.0)
    calls = []

    def spy(text, latents, t, noise, owners):
        if not text.requires_grad:  # scoring on the fixed set, not the update
            return PromptInversion.prompt_losses(module, text, latents, t, noise, owners)
        free = slice(1, 1 + module.hparams.prompt_length)  # [BOS] free positions [EOS] ...
        call = dict(prompt=text[:, free].detach().clone(), soft=module.soft_prompt[:1].detach().clone())

        def keep_grad(grad):
            call.setdefault("grad", grad[:, free].detach().clone())

        text.register_hook(keep_grad)
        calls.append(call)
        return PromptInversion.prompt_losses(module, text, latents, t, noise, owners)

    with mock.patch.object(module, "prompt_losses", side_effect=spy), mock.patch.object(module, "results", return_value=[]):
        _fit(module, image_folder, tmp_path, limit=1)
    first, second = calls
    assert torch.allclose(second["soft"], first["soft"] - 3.0 * first["grad"], atol=1e-6)
    assert not torch.equal(second["soft"], second["prompt"])  # ê left the vocabulary ...
    assert torch.allclose(second["prompt"], module.token_embeds(module.project(second["soft"])), atol=1e-6)  # ẽ did not
    assert torch.allclose(module.soft_prompt[:1], second["soft"] - 3.0 * second["grad"], atol=1e-6)


def test_ph2p_draws_fresh_timesteps_at_each_evaluation_and_lbfgs_keeps_one_set(tiny_model, image_folder, tmp_path):
    for optimizer, fresh in (("ph2p", True), ("lbfgs", False)):
        module = _module(tiny_model, optimizer=optimizer, steps=1, max_iter=3, draws=2)
        with mock.patch.object(module, "prompt_losses", wraps=module.prompt_losses) as losses:
            _fit(module, image_folder, tmp_path / optimizer, limit=1)
        draws = [c.args[2] for c in losses.call_args_list if c.args[0].requires_grad]
        assert len(draws) >= 2  # L-BFGS may stop a step early on its tolerances
        assert all(torch.equal(draws[0], d) for d in draws[1:]) != fresh


def test_lbfgs_on_the_continuous_prompt_lowers_a_fixed_loss(tiny_model):
    module = _module(tiny_model)
    module.setup("fit")
    torch.manual_seed(0)
    latents = module.backbone.encode_images(torch.rand(1, 3, 16, 16) * 2 - 1)
    t, noise = module.sampler.fixed("x", module.backbone.latent_shape)
    t, noise = t[None], noise[None]
    prompt = torch.nn.Parameter(torch.randn(1, 4, module.soft_prompt.shape[-1]) * 0.1)
    opt = BatchedLBFGS(prompt, lr=0.5, max_iter=10)

    def closure():
        opt.zero_grad()
        losses = module.prompt_losses(module.full_prompt(prompt), latents, t, noise)
        losses.sum().backward()
        return losses

    before = float(closure())
    for _ in range(3):
        opt.step(closure)
    assert float(closure()) < before


def test_projected_tokens_change_over_a_run(tiny_model, image_folder, tmp_path):
    module = _module(tiny_model, steps=6, max_iter=5, lr=50.0)
    _fit(module, image_folder, tmp_path, callbacks=[ResultsWriter()], limit=1)
    module.image_ids = ["img0.png"]
    initial = module.initial_ids()[0].tolist()
    final = read_jsonl(tmp_path / "prompts.jsonl")[0]["token_ids"]
    assert final != initial


def test_checkpoint_holds_prompt_and_optimizer_but_no_frozen_model(tiny_model, image_folder, tmp_path):
    module = _module(tiny_model, optimizer="lbfgs", steps=4, batch_size=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _fit(module, image_folder, tmp_path, callbacks=[ckpt], limit=2, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"  # written mid-inversion: step 2 of 4
    checkpoint = torch.load(path, weights_only=False)
    assert list(checkpoint["state_dict"]) == ["soft_prompt"]
    opt_state = checkpoint["optimizer_states"][0]["state"][0]
    assert {"S", "Y", "rho", "n_iter"} <= set(opt_state)
    assert checkpoint["ph2p"]["step_in_batch"] == 2
    frozen = sum(p.numel() for m in (module.backbone.unet, module.backbone.vae, module.backbone.text_encoder)
                 for p in m.parameters())
    stored = sum(t.numel() for t in checkpoint["state_dict"].values())
    assert stored == 2 * 4 * module.soft_prompt.shape[-1] < frozen


class FinalSoftPrompts(L.Callback):
    """The continuous prompt of each image when its last step is done."""

    def __init__(self):
        self.soft = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for k, image_id in enumerate(module.image_ids):
            self.soft[image_id] = module.soft_prompt[k].detach().clone()


@pytest.mark.parametrize("optimizer", ["ph2p", "lbfgs"])
def test_batch_of_images_equals_one_at_a_time(tiny_model, image_folder, tmp_path, optimizer):
    """Each image keeps its own prompt, draws and (lbfgs) curvature history in a batch.

    Tokens must be equal. The continuous prompts agree to a stated tolerance, not bit for bit:
    the U-Net's kernels sum in a different order at batch 2 than at batch 1 (float32 rounding,
    about 1e-7 of the loss), and L-BFGS's curvature pairs carry that rounding forward (measured:
    about 3e-6 relative after 6 steps).
    """
    prompts, soft = {}, {}
    for batch_size in (1, 2):
        out = tmp_path / f"b{batch_size}"
        kw = dict(lr=20.0) if optimizer == "ph2p" else dict(optimizer="lbfgs", lr=1.0)
        module = _module(tiny_model, steps=6, max_iter=3, batch_size=batch_size, **kw)
        final = FinalSoftPrompts()
        _fit(module, image_folder, out, callbacks=[ResultsWriter(), final], limit=2)
        prompts[batch_size] = {r["image_id"]: r["token_ids"] for r in read_jsonl(out / "prompts.jsonl")}
        soft[batch_size] = final.soft
    assert prompts[1] == prompts[2] and len(prompts[1]) == 2
    for image_id, single in soft[1].items():
        assert torch.allclose(soft[2][image_id], single, rtol=0, atol=1e-4 * float(single.abs().max()))


def test_adam_ablation_runs_one_evaluation_per_step(tiny_model, image_folder, tmp_path):
    module = _module(tiny_model, optimizer="adam", lr=0.05, steps=3)
    with mock.patch.object(module, "prompt_losses", wraps=module.prompt_losses) as losses:
        _fit(module, image_folder, tmp_path, limit=1)
    assert len([c for c in losses.call_args_list if c.args[0].requires_grad]) == 3


def test_negative_image_objective_is_guarded(tiny_model):
    """L(target) − w·min(L(negative), L(target) + margin); past the margin only L(target) pulls."""
    module = _module(tiny_model, negative_weight=1.0, negative_margin=0.05, batch_size=2)
    module.setup("fit")
    g = torch.Generator().manual_seed(0)
    module.latents = torch.randn((2, *module.backbone.latent_shape), generator=g)
    module.negative_latents = torch.randn((2, *module.backbone.latent_shape), generator=g)
    t, noise = torch.tensor([[600], [700]]), torch.randn((2, 1, *module.backbone.latent_shape), generator=g)
    prompt = torch.randn(2, 4, module.soft_prompt.shape[-1], generator=g).requires_grad_()
    target = module.prompt_losses(module.full_prompt(prompt), module.latents, t, noise)
    negative = module.prompt_losses(module.full_prompt(prompt), module.negative_latents, t, noise)
    objective = module.objective(module.full_prompt(prompt), t, noise)
    expected = target - torch.minimum(negative, target + 0.05)
    assert torch.allclose(objective, expected, atol=1e-6)
    module.hparams.negative_margin = None  # the paper's objective
    assert torch.allclose(module.objective(module.full_prompt(prompt), t, noise), target - negative, atol=1e-6)
    module.hparams.negative_margin = -10.0  # always capped: the gradient is that of L(target) alone
    (grad,) = torch.autograd.grad(module.objective(module.full_prompt(prompt), t, noise).sum(), prompt)
    (alone,) = torch.autograd.grad(module.prompt_losses(module.full_prompt(prompt), module.latents, t, noise).sum(), prompt)
    assert torch.allclose(grad, alone, atol=1e-6)


def test_negatives_pair_by_name_mapping_or_one_file(tiny_model, image_folder, tmp_path):
    import json

    from ph2p_lit.errors import InputError

    def negatives_of(negatives):
        data = ImageDataModule(root=image_folder, model=tiny_model, negatives=str(negatives), batch_size=2, steps=1)
        data.setup("fit")
        return {it["image_id"]: it["negative_source"] for it in data.images.items}

    one = f"{image_folder}/img3.png"
    assert set(negatives_of(one).values()) == {one}
    assert negatives_of(image_folder)["img1.png"] == f"{image_folder}/img1.png"
    mapping = tmp_path / "pairs.jsonl"
    mapping.write_text("".join(json.dumps({"image": f"img{i}.png", "negative": f"{image_folder}/img{3 - i}.png"}) + "\n"
                               for i in range(3)))
    with pytest.raises(InputError, match="no negative image for img3.png"):
        negatives_of(mapping)


def test_inversion_with_a_negative_image_records_it(tiny_model, image_folder, tmp_path):
    module = _module(tiny_model, steps=2, max_iter=1)
    data = ImageDataModule(root=image_folder, batch_size=1, steps=2, model=tiny_model, limit=2,
                           negatives=f"{image_folder}/img3.png")
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[ResultsWriter()])
    with mock.patch.object(module, "prompt_losses", wraps=module.prompt_losses) as losses:
        trainer.fit(module, datamodule=data)
    rows = read_jsonl(tmp_path / "prompts.jsonl")
    assert [r["negative_source"] for r in rows] == [f"{image_folder}/img3.png"] * 2
    assert all(c.args[1].shape[0] == 2 for c in losses.call_args_list)  # target and negative in one batch


def test_best_prompt_by_clip_similarity_keeps_the_most_similar_scored_prompt(tiny_model, image_folder, tiny_clip,
                                                                             tmp_path):
    """select_by=clip: the kept prompt is, of every prompt scored, the one whose generated image
    is most CLIP-similar to its own target; the record's similarity is that image's."""
    from ph2p_lit.generate import generate
    from ph2p_lit.images import to_pixels
    from ph2p_lit.selection import ImageSelector, Selection
    from ph2p_lit.similarity import ClipSimilarity

    selection = Selection(every_n_steps=1, select_by="clip", clip_model=tiny_clip, generation_steps=3)
    module = _module(tiny_model, steps=4, batch_size=2, lr=20.0, selection=selection)
    scored = []
    update = ImageSelector.update
    ImageSelector.update = lambda self, backbone, prompts, ids, targets, step: (
        scored.append(ids), update(self, backbone, prompts, ids, targets, step))
    try:
        _fit(module, image_folder, tmp_path, limit=2)
    finally:
        ImageSelector.update = update
    rows = {r["image_id"]: r for r in read_jsonl(tmp_path / "prompts.jsonl")}
    clip = ClipSimilarity(tiny_clip, local_files_only=True)
    for k, image_id in enumerate(["img0.png", "img1.png"]):
        with Image.open(f"{image_folder}/{image_id}") as image:
            target = to_pixels(image, module.backbone.resolution)[None]
        candidates = {tuple(ids[k]) for ids in scored}
        texts = [module.vocab.decode(list(ids)) for ids in candidates]
        sims = clip(target.expand(len(texts), -1, -1, -1),
                    generate(module.backbone, texts, 3, 7.5, shared_noise=True)).tolist()
        row = rows[image_id]
        assert row["selected_by"] == "clip" and len(candidates) > 1
        assert row["best_similarity"] == pytest.approx(max(sims), abs=1e-4)
        assert row["prompt"] == texts[sims.index(max(sims))]


def test_records_count_every_unet_evaluation(tiny_model, image_folder, tmp_path):
    """3 steps x 2 evaluations x 1 draw, plus 8 fixed draws at the scorings of steps 1 and 3 (the
    record's final loss is step 3's scoring, not a third one): 6 + 16 U-Net samples."""
    module = _module(tiny_model, steps=3, max_iter=2, draws=1, eval_draws=8, score_every_n_steps=10)
    _fit(module, image_folder, tmp_path, callbacks=[ResultsWriter()], limit=1)
    (row,) = read_jsonl(tmp_path / "prompts.jsonl")
    assert row["unet_evals"] == 3 * 2 * 1 + 2 * 8


def test_a_plateau_stops_an_image_and_its_record_says_when(tiny_model, image_folder, tmp_path):
    """No scoring can beat the first by min_delta, so the image stops at its second scoring."""
    module = _module(tiny_model, steps=10, score_every_n_steps=1, patience=1, min_delta=1e9)
    _fit(module, image_folder, tmp_path, callbacks=[ResultsWriter()], limit=1)
    (row,) = read_jsonl(tmp_path / "prompts.jsonl")
    assert row["steps"] == 2 and row["best_step"] == 1


def test_refinement_runs_on_the_model_within_its_budget_and_filters(tiny_model, image_folder, tmp_path):
    from ph2p_lit.refine import Refinement

    settings = Refinement(draws=4, screen_draws=2, top_k=4, nearest_k=1, per_position=2, finalists=2, budget=200,
                          prune_tolerance=0.5)
    module = _module(tiny_model, steps=2, refinement=settings, deny=["a", "the"], batch_size=2)
    _fit(module, image_folder, tmp_path, callbacks=[ResultsWriter()], limit=2)
    rows = read_jsonl(tmp_path / "prompts.jsonl")
    denied = set(module.vocab.word_ids(["a", "the"]))
    for row in rows:
        refined = row["refinement"]
        assert refined["unet_evals"] <= 200 + 4 * 4 * 4  # the budget, and pruning's deletions on all draws
        assert not denied & set(row["token_ids"]) and len(row["token_ids"]) <= 4
        assert refined["objective"] <= refined["start_objective"] + 0.5 * refined["loss"]
        assert row["unet_evals"] > refined["unet_evals"]


def test_images_at_another_resolution_than_the_models_invert(tiny_model, image_folder, tmp_path):
    """The noise follows the images' latents, not the VAE config's sample_size (a real model run
    at a reduced resolution on a CPU, or a 768 px model given 512 px images)."""
    from ph2p_lit.cli import main
    from ph2p_lit.runs import read_jsonl

    main(["invert", f"--model.model={tiny_model}", "--model.prompt_length=2", "--model.steps=2", "--model.max_iter=1",
          "--model.refinement.draws=2", "--model.refinement.budget=20", f"--data.root={image_folder}", "--data.limit=1",
          "--data.resolution=32", f"--trainer.default_root_dir={tmp_path}"])  # the tiny model's own is 16
    (row,) = read_jsonl(tmp_path / "prompts.jsonl")
    assert row["steps"] == 2 and row["prompt"]


def test_results_are_whole_whatever_the_callback_order_or_list(tiny_model, image_folder, tmp_path):
    """The writer first, last or not listed at all: every image's line, with its best loss (a
    callback rewrote the records before; listed after the writer, best_loss was null; a list
    without the writer lost every result)."""
    runs = {"first": [ResultsWriter(), PromptLogger(every_n_steps=1)],
            "last": [PromptLogger(every_n_steps=1), ResultsWriter()], "absent": [PromptLogger(every_n_steps=1)]}
    for name, callbacks in runs.items():
        _fit(_module(tiny_model, steps=2, batch_size=2), image_folder, tmp_path / name, callbacks=callbacks, limit=2)
        rows = read_jsonl(tmp_path / name / "prompts.jsonl")
        assert sorted(r["image_id"] for r in rows) == ["img0.png", "img1.png"], name
        assert all(isinstance(r["best_loss"], float) and r["steps"] == 2 for r in rows), name


def test_steps_batch_size_and_model_have_one_home(tiny_model, image_folder, tmp_path):
    """From Python the data follows the module's steps and model and the module the data's batch
    size; two different values are a one-line error, not 0 lines written or a raw RuntimeError."""
    module = PromptInversion(model=tiny_model, prompt_length=2, steps=3, max_iter=1, init_prompt=None)
    data = ImageDataModule(root=image_folder, batch_size=2, limit=2)
    trainer = L.Trainer(default_root_dir=tmp_path / "ok", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(module, datamodule=data)
    rows = read_jsonl(tmp_path / "ok" / "prompts.jsonl")
    assert len(rows) == 2 and all(r["steps"] == 3 for r in rows)
    assert module.soft_prompt.shape[0] == 2
    for name, model_kw, data_kw, match in [
        ("steps", {"steps": 4}, {"steps": 2}, "data.steps=2 but model.steps=4"),
        ("batch", {"batch_size": 3}, {"batch_size": 2}, "model.batch_size=3 but data.batch_size=2"),
    ]:
        module = PromptInversion(model=tiny_model, prompt_length=2, max_iter=1, init_prompt=None,
                                 **{"steps": 1, **model_kw})
        data = ImageDataModule(root=image_folder, limit=2, **{"batch_size": 2, **data_kw})
        trainer = L.Trainer(default_root_dir=tmp_path / name, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False)
        with pytest.raises(InputError, match=match):
            trainer.fit(module, datamodule=data)


def test_each_image_has_a_textual_inversion_file_that_diffusers_loads(tiny_model, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    module = _module(tiny_model, steps=2, batch_size=2)
    _fit(module, image_folder, tmp_path, limit=2)
    rows = {r["image_id"]: r for r in read_jsonl(tmp_path / "prompts.jsonl")}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    for image_id, row in rows.items():
        (token, vectors), = load_file(tmp_path / row["embedding"]).items()
        assert token == f"<{image_id}>" and vectors.shape == (4, module.backbone.token_table.shape[1])
        pipe.load_textual_inversion(tmp_path / row["embedding"])
        text = pipe.maybe_convert_prompt(f"a {token} b", pipe.tokenizer)  # diffusers' multi-vector expansion
        ids = pipe.tokenizer(text, add_special_tokens=False).input_ids[1:-1]
        assert len(ids) == 4  # the token stands for the image's 4 soft vectors
        table = pipe.text_encoder.get_input_embeddings().weight
        assert torch.equal(table[ids].detach(), vectors)
    # The continuous prompt is where the run left the soft prompt: its projection is the final prompt.
    vectors = load_file(tmp_path / rows["img0.png"]["embedding"])["<img0.png>"]
    assert module.vocab.decode(module.vocab.project(vectors[None])[0].tolist()) == rows["img0.png"]["final_prompt"]
