"""SHIP (ICCV 2023): a VAE whose decoder is the frozen CLIP text tower fed a learnable global
prompt plus a local bias generated from the latent code; math only, no store I/O."""

from __future__ import annotations

import torch
from torch import nn

from .configs import ShipConfig
from .text_encoder import ClassPrompts, PromptEncoder


class ShipGenerator(nn.Module):
    """Encoder x -> (mu, logvar); generator z -> local bias b (W); decoder = prompt encoder over
    `[SOS] v_1+b .. v_n+b {class}. [EOS]`. D and W are read from the decoder (the CLIP model)."""

    decoder: PromptEncoder

    def __init__(self, decoder: PromptEncoder, config: ShipConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ShipConfig()
        dim, width = decoder.embed_dim, decoder.width  # D, W
        self.encoder = nn.Sequential(nn.Linear(dim, config.encoder_hidden), nn.ReLU())
        self.mu_head = nn.Linear(config.encoder_hidden, config.latent_dim)
        self.logvar_head = nn.Linear(config.encoder_hidden, config.latent_dim)
        activation = nn.LeakyReLU(0.2) if config.leaky else nn.ReLU()
        self.bias_generator = nn.Sequential(
            nn.Linear(config.latent_dim, config.generator_hidden), activation,
            nn.Linear(config.generator_hidden, width),
        )
        self.prompt = nn.Parameter(torch.empty(config.n_ctx, width))  # (n, W) global prompt
        self._init_weights(config.init_std)
        # Held by reference, not registered: the frozen CLIP weights belong to the CLIP model and
        # stay out of this module's parameters(), state_dict() and .to().
        object.__setattr__(self, "decoder", decoder)
        self.to(decoder.device)

    def _init_weights(self, std: float) -> None:
        nn.init.normal_(self.prompt, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) image features -> mu, logvar, each (B, L)."""
        hidden = self.encoder(x)  # (B, H)
        return self.mu_head(hidden), self.logvar_head(hidden)

    def decode(self, z: torch.Tensor, labels: torch.Tensor,
               prompts: ClassPrompts) -> torch.Tensor:
        """(B, L) latents, (B,) class indices -> (B, D) normalized features."""
        bias = self.bias_generator(z)  # (B, W)
        return self.decoder(self.prompt, labels, prompts, bias=bias)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, prompts: ClassPrompts,
                generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D) features of classes `labels` -> (x_hat (B, D), mu (B, L), logvar (B, L))."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation: (B, L)
        return self.decode(z, labels, prompts), mu, logvar

    @torch.no_grad()
    def sample(self, class_indices: torch.Tensor, prompts: ClassPrompts,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Synthesize one normalized feature (B, D) per class index, z ~ N(0, I_L)."""
        shape = (class_indices.shape[0], self.config.latent_dim)
        z = torch.randn(shape, generator=generator, device=self.prompt.device)  # (B, L)
        return self.decode(z, class_indices.to(self.prompt.device), prompts)


def ship_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, recon, kl), batch means of ||x_hat - x||^2 and KL(N(mu, sigma^2) || N(0, I))."""
    recon = (x_hat - x).pow(2).sum(dim=-1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)).mean()
    return recon + kl_weight * kl, recon, kl
