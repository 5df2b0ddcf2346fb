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


def test_ship_loss_sums_over_feature_dims_and_averages_over_the_batch() -> None:
    """Three samples of two dims (not square, so the two axes cannot stand in for each other);
    the KL term at unit variance is half the squared mean; the default KL weight is 1."""
    x = torch.zeros(3, 2)
    x_hat = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])  # squared norms 5, 0, 9
    mu = torch.tensor([[-1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])  # KL 2.5, 0, 4.5 at logvar 0
    total, recon, kl = ship_loss(x_hat, x, mu, torch.zeros(3, 2))
    assert recon.item() == pytest.approx(14 / 3)
    assert kl.item() == pytest.approx(7 / 3)
    assert total.item() == pytest.approx(7.0)


def test_encoder_and_generator_layers(encoder: PromptEncoder) -> None:
    """Encoder Linear(D, H) + ReLU; generator Linear(L, G), ReLU (LeakyReLU(0.2) in the ImageNet
    variant), Linear(G, W); the global prompt (n, W)."""
    model = _model(encoder)
    assert [type(m) for m in model.encoder] == [torch.nn.Linear, torch.nn.ReLU]
    assert model.encoder[0].in_features == encoder.embed_dim
    assert model.encoder[0].out_features == SMALL.encoder_hidden
    assert [type(m) for m in model.bias_generator] == [torch.nn.Linear, torch.nn.ReLU,
                                                        torch.nn.Linear]
    assert model.bias_generator[2].out_features == encoder.width
    assert model.prompt.shape == (SMALL.n_ctx, encoder.width)


def test_forward_reparameterises_z_as_mu_plus_eps_times_sigma(encoder: PromptEncoder) -> None:
    """z = mu + eps * exp(logvar / 2), eps from the caller's generator: with mu = 0.5 and
    logvar = log 4 everywhere, z = 0.5 + 2 eps."""
    model = _model(encoder)
    for head, value in ((model.mu_head, 0.5), (model.logvar_head, math.log(4.0))):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, value)
    seen: list[torch.Tensor] = []
    decode = model.decode
    model.decode = lambda z, labels, prompts: seen.append(z) or decode(z, labels, prompts)  # type: ignore[method-assign]
    x, labels = _batch(encoder.embed_dim, n=4)
    model(x, labels, encoder.class_prompts(NAMES, n_ctx=SMALL.n_ctx),
          generator=torch.Generator().manual_seed(5))
    eps = torch.randn(4, SMALL.latent_dim, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen[0], 0.5 + 2.0 * eps)
