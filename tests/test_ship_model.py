"""SHIP generator and loss on the tiny model: shapes, the loss formula, sampling, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from shipyard.pipeline.configs import ShipConfig
from shipyard.pipeline.models import ClipModel
from shipyard.pipeline.registry import ship_variants
from shipyard.pipeline.ship import ShipGenerator, ship_loss
from shipyard.pipeline.text_encoder import PromptEncoder

NAMES = ["cat", "golden retriever puppy", "red-winged blackbird"]
SMALL = ShipConfig(latent_dim=16, encoder_hidden=32, generator_hidden=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(encoder: PromptEncoder, config: ShipConfig = SMALL, seed: int = 0) -> ShipGenerator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShipGenerator(encoder, config)


def _batch(dim: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    return x, torch.arange(n) % len(NAMES)


def test_ship_loss_on_a_hand_computed_case() -> None:
    x_hat = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    x = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    total, recon, kl = ship_loss(x_hat, x, mu, logvar, kl_weight=0.5)
    # recon: (2 + 0) / 2; KL of sample 0: -1/2 [(1 + 0 - 1 - 1) + (1 + log 2 - 0 - 2)], sample 1: 0
    expected_kl = (1 - 0.5 * math.log(2.0)) / 2
    assert recon.item() == pytest.approx(1.0)
    assert kl.item() == pytest.approx(expected_kl)
    assert total.item() == pytest.approx(1.0 + 0.5 * expected_kl)


def test_kl_is_zero_for_the_prior() -> None:
    x = F.normalize(torch.randn(5, 8), dim=-1)
    total, recon, kl = ship_loss(x, x, torch.zeros(5, 16), torch.zeros(5, 16))
    assert kl.item() == 0.0 and recon.item() == 0.0 and total.item() == 0.0


def test_shapes_come_from_the_model(clip: ClipModel, encoder: PromptEncoder) -> None:
    model = _model(encoder)
    prompts = encoder.class_prompts(NAMES, n_ctx=SMALL.n_ctx)
    x, labels = _batch(clip.embed_dim)
    x_hat, mu, logvar = model(x, labels, prompts)
    assert x_hat.shape == (len(labels), clip.embed_dim)
    assert mu.shape == logvar.shape == (len(labels), SMALL.latent_dim)
    assert model.prompt.shape == (SMALL.n_ctx, clip.text_width)
    assert model.bias_generator[-1].out_features == clip.text_width
    assert model.encoder[0].in_features == clip.embed_dim
    assert torch.allclose(x_hat.norm(dim=-1), torch.ones(len(labels)), atol=1e-6)


def test_clip_weights_are_neither_trained_nor_saved(clip: ClipModel,
                                                    encoder: PromptEncoder) -> None:
    model = _model(encoder)
    clip_params = {id(p) for p in clip.model.parameters()}
    assert not clip_params & {id(p) for p in model.parameters()}
    assert all(not key.startswith("decoder") for key in model.state_dict())
    x, labels = _batch(clip.embed_dim)
    x_hat, mu, logvar = model(x, labels, encoder.class_prompts(NAMES))
    ship_loss(x_hat, x, mu, logvar)[0].backward()
    assert all(p.grad is None for p in clip.model.parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_imagenet_variant_and_init(encoder: PromptEncoder) -> None:
    config = ship_variants()["imagenet"].config
    assert config.encoder_hidden == 4096 and config.leaky
    model = _model(encoder, ShipConfig(latent_dim=16, encoder_hidden=32, generator_hidden=64,
                                       leaky=True))
    assert isinstance(model.bias_generator[1], torch.nn.LeakyReLU)
    assert model.bias_generator[1].negative_slope == pytest.approx(0.2)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in model.modules()
               if isinstance(m, torch.nn.Linear))
    wide = _model(encoder, ShipConfig())
    assert float(wide.bias_generator[0].weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(wide.prompt.detach().std()) == pytest.approx(0.02, rel=0.2)


def test_sample_is_deterministic_given_a_seeded_generator(clip: ClipModel,
                                                          encoder: PromptEncoder) -> None:
    model = _model(encoder)
    prompts = encoder.class_prompts(NAMES)
    classes = torch.tensor([0, 1, 2, 2, 1])
    first = model.sample(classes, prompts, torch.Generator().manual_seed(7))
    again = model.sample(classes, prompts, torch.Generator().manual_seed(7))
    other = model.sample(classes, prompts, torch.Generator().manual_seed(8))
    assert first.shape == (len(classes), clip.embed_dim) and not first.requires_grad
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_few_optimisation_steps_reduce_the_loss(clip: ClipModel,
                                                  encoder: PromptEncoder) -> None:
    model = _model(encoder)
    prompts = encoder.class_prompts(NAMES)
    x, labels = _batch(clip.embed_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss(seed: int) -> torch.Tensor:
        x_hat, mu, logvar = model(x, labels, prompts, torch.Generator().manual_seed(seed))
        return ship_loss(x_hat, x, mu, logvar)[0]

    with torch.no_grad():
        before = loss(0).item()
    for step in range(20):
        optimizer.zero_grad()
        loss(step + 1).backward()
        optimizer.step()
    with torch.no_grad():
        after = loss(0).item()
    assert after < 0.9 * before
