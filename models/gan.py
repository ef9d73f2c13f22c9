"""GAN objectives on discriminator scores and the alternating D/G update.

Every function here takes raw discriminator outputs (logits or unbounded scores), never
probabilities: the probability is ``D(x) = sigmoid(score)`` and the logarithms are taken
in the stable ``logsigmoid`` / ``softplus`` form. Expectations are plain means over all
elements unless a non-negative weight tensor is given, in which case they are weighted
means; the weights let a caller plug quadrature weights (density times grid spacing) in
and evaluate the objectives as integrals instead of sample averages.

Sign conventions: every ``*_loss`` function returns a quantity to *minimise*.
The discriminator ascends the minimax value V by descending ``-V``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

AdversarialLoss = Literal["minimax", "non_saturating", "hinge", "rahinge"]
ADVERSARIAL_LOSSES: tuple[str, ...] = get_args(AdversarialLoss)


@dataclass(frozen=True)
class DiscriminatorLoss:
    """The discriminator loss split into its real-data and generated-data terms."""

    real: Tensor
    fake: Tensor

    @property
    def total(self) -> Tensor:
        return self.real + self.fake


class DiscriminatorLossFn(Protocol):
    def __call__(
        self,
        real_scores: Tensor,
        fake_scores: Tensor,
        *,
        real_weight: Tensor | None = None,
        fake_weight: Tensor | None = None,
    ) -> DiscriminatorLoss: ...


class GeneratorLossFn(Protocol):
    def __call__(
        self,
        fake_scores: Tensor,
        real_scores: Tensor | None = None,
        *,
        real_weight: Tensor | None = None,
        fake_weight: Tensor | None = None,
    ) -> Tensor: ...


def expectation(values: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean of ``values``, or its weighted mean when ``weight`` (broadcastable) is given."""
    if weight is None:
        return values.mean()

    weight = torch.broadcast_to(weight, values.shape).to(values.dtype)
    total = weight.sum()
    if not bool(total > 0):
        raise ValueError(f"expectation weights must sum to a positive value, got {total}")
    return (weight * values).sum() / total


# ---------------------------------------------------------------------------------------
# Original minimax game (Goodfellow et al. 2014) and its non-saturating generator loss.
# ---------------------------------------------------------------------------------------


def minimax_value(
    real_scores: Tensor,
    fake_scores: Tensor,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> Tensor:
    """V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))] with D = sigmoid(score).

    ``log D = logsigmoid(s)`` and ``log(1 - D) = logsigmoid(-s)``: exact and finite for
    any score, which ``torch.log(torch.sigmoid(s))`` is not. The discriminator
    maximises this value, the generator minimises it.
    """
    real_term = expectation(F.logsigmoid(real_scores), real_weight)
    fake_term = expectation(F.logsigmoid(-fake_scores), fake_weight)
    return real_term + fake_term


def minimax_discriminator_loss(
    real_scores: Tensor,
    fake_scores: Tensor,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> DiscriminatorLoss:
    """-V(D, G) split into terms: binary cross-entropy with real = 1 and fake = 0.

    ``-log D = softplus(-s)`` and ``-log(1 - D) = softplus(s)``; ``real + fake == -V``.
    """
    real = expectation(F.softplus(-real_scores), real_weight)
    fake = expectation(F.softplus(fake_scores), fake_weight)
    return DiscriminatorLoss(real=real, fake=fake)


def minimax_generator_loss(
    fake_scores: Tensor,
    real_scores: Tensor | None = None,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> Tensor:
    """The generator's part of V: E_z[log(1 - D(G(z)))], minimised by G.

    Saturates: its gradient with respect to the score is ``-D(G(z))``, which vanishes
    when the discriminator confidently rejects the samples (early in training).
    ``real_scores`` is accepted for a uniform signature and ignored.
    """
    return expectation(F.logsigmoid(-fake_scores), fake_weight)


def non_saturating_generator_loss(
    fake_scores: Tensor,
    real_scores: Tensor | None = None,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> Tensor:
    """-E_z[log D(G(z))]: same fixed point as the minimax loss, gradient ``D - 1``.

    The gradient stays near -1 when D(G(z)) is near 0, which is where the minimax
    loss stalls. ``real_scores`` is accepted for a uniform signature and ignored.
    """
    return expectation(F.softplus(-fake_scores), fake_weight)


# ---------------------------------------------------------------------------------------
# Hinge and relativistic-average hinge.
# ---------------------------------------------------------------------------------------


def hinge_discriminator_loss(
    real_scores: Tensor,
    fake_scores: Tensor,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> DiscriminatorLoss:
    """E[relu(1 - D(x))] + E[relu(1 + D(G(z)))] on raw scores."""
    real = expectation(F.relu(1.0 - real_scores), real_weight)
    fake = expectation(F.relu(1.0 + fake_scores), fake_weight)
    return DiscriminatorLoss(real=real, fake=fake)


def hinge_generator_loss(
    fake_scores: Tensor,
    real_scores: Tensor | None = None,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> Tensor:
    """-E[D(G(z))]. ``real_scores`` is accepted for a uniform signature and ignored."""
    return -expectation(fake_scores, fake_weight)


def _relativistic_scores(
    real_scores: Tensor,
    fake_scores: Tensor,
    real_weight: Tensor | None,
    fake_weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Each score minus the average score of the other side: ``(real_rel, fake_rel)``.

    The average runs over every element of the other tensor (batch and, for a patch
    discriminator, every patch position), weighted when weights are given.
    """
    real_rel = real_scores - expectation(fake_scores, fake_weight)
    fake_rel = fake_scores - expectation(real_scores, real_weight)
    return real_rel, fake_rel


def rahinge_discriminator_loss(
    real_scores: Tensor,
    fake_scores: Tensor,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> DiscriminatorLoss:
    """Relativistic-average hinge for D, the adversarial loss of the bi-layer model.

    E[relu(1 - (D(x) - mean D(G(z))))] + E[relu(1 + (D(G(z)) - mean D(x)))]:
    real samples should score at least 1 above the average fake, and vice versa.
    """
    real_rel, fake_rel = _relativistic_scores(real_scores, fake_scores, real_weight, fake_weight)
    real = expectation(F.relu(1.0 - real_rel), real_weight)
    fake = expectation(F.relu(1.0 + fake_rel), fake_weight)
    return DiscriminatorLoss(real=real, fake=fake)


def rahinge_generator_loss(
    fake_scores: Tensor,
    real_scores: Tensor | None = None,
    *,
    real_weight: Tensor | None = None,
    fake_weight: Tensor | None = None,
) -> Tensor:
    """Relativistic-average hinge for G: the discriminator's loss with the roles swapped.

    E[relu(1 + (D(x) - mean D(G(z))))] + E[relu(1 - (D(G(z)) - mean D(x)))]. Needs the
    real scores; gradients reach G through both terms (through the fake average in the
    first one).
    """
    if real_scores is None:
        raise ValueError("the relativistic generator loss needs real_scores, got None")

    real_rel, fake_rel = _relativistic_scores(real_scores, fake_scores, real_weight, fake_weight)
    real = expectation(F.relu(1.0 + real_rel), real_weight)
    fake = expectation(F.relu(1.0 - fake_rel), fake_weight)
    return real + fake


# ---------------------------------------------------------------------------------------
# Feature matching and the loss selector.
# ---------------------------------------------------------------------------------------


def feature_matching_loss(
    real_features: Sequence[Tensor], fake_features: Sequence[Tensor]
) -> Tensor:
    """Mean over layers of the L1 distance between discriminator features.

    The real features are detached: the loss trains the generator only. Each layer's
    L1 is a mean over its elements, so layers of different sizes weigh the same.
    """
    if len(real_features) != len(fake_features):
        raise ValueError(
            "feature matching needs as many real as fake feature maps, got "
            f"{len(real_features)} real and {len(fake_features)} fake"
        )
    if len(real_features) == 0:
        raise ValueError("feature matching needs at least one feature map, got none")

    per_layer = []
    for index, (real, fake) in enumerate(zip(real_features, fake_features, strict=True)):
        if real.shape != fake.shape:
            raise ValueError(
                f"feature map {index}: real shape {tuple(real.shape)} differs from fake "
                f"shape {tuple(fake.shape)}"
            )
        per_layer.append(F.l1_loss(fake, real.detach()))
    return torch.stack(per_layer).mean()


_LOSSES: dict[str, tuple[DiscriminatorLossFn, GeneratorLossFn]] = {
    "minimax": (minimax_discriminator_loss, minimax_generator_loss),
    "non_saturating": (minimax_discriminator_loss, non_saturating_generator_loss),
    "hinge": (hinge_discriminator_loss, hinge_generator_loss),
    "rahinge": (rahinge_discriminator_loss, rahinge_generator_loss),
}


def adversarial_losses(kind: AdversarialLoss) -> tuple[DiscriminatorLossFn, GeneratorLossFn]:
    """``(d_loss_fn, g_loss_fn)`` for one of ``minimax | non_saturating | hinge | rahinge``.

    ``minimax`` and ``non_saturating`` share the discriminator loss (-V); they differ
    only in the generator's loss.
    """
    if kind not in _LOSSES:
        raise ValueError(f"adversarial loss must be one of {ADVERSARIAL_LOSSES}, got {kind!r}")
    return _LOSSES[kind]


# ---------------------------------------------------------------------------------------
# Alternating updates: k discriminator steps, then one generator step.
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Turn off ``requires_grad`` on a module's parameters, restoring the flags after.

    Inside, backward passes still flow *through* the module to its inputs, but leave no
    gradients on its parameters, so the other player's optimiser cannot touch them.
    """
    if module is None:
        yield
        return

    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


StepFn = Callable[[], Mapping[str, Tensor | float]]


def _as_float(value: Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def alternating_step(
    d_step: StepFn,
    g_step: StepFn,
    k: int = 1,
    *,
    generator: nn.Module | None = None,
    discriminator: nn.Module | None = None,
) -> dict[str, float]:
    """One round of Goodfellow et al.'s Algorithm 1: ``k`` D updates, then one G update.

    ``d_step`` and ``g_step`` each sample their own batch, compute their losses,
    back-propagate and step their own optimiser, and return named statistics
    (``loss/D/real``, ``loss/G/adv``, ...). When ``generator`` / ``discriminator`` are
    given, the other player's parameters are frozen during each step. The result holds
    the discriminator statistics averaged over the ``k`` steps and the generator's.
    """
    if k < 1:
        raise ValueError(f"k (discriminator steps per generator step) must be >= 1, got {k}")

    # k discriminator steps (ascent on V), generator frozen.
    d_sums: dict[str, float] = {}
    for _ in range(k):
        with frozen(generator):
            d_stats = d_step()
        for name, value in d_stats.items():
            d_sums[name] = d_sums.get(name, 0.0) + _as_float(value)
    stats = {name: total / k for name, total in d_sums.items()}

    # One generator step (descent), discriminator frozen.
    with frozen(discriminator):
        g_stats = g_step()
    for name, value in g_stats.items():
        if name in stats:
            raise ValueError(f"statistic {name!r} returned by both the D and the G step")
        stats[name] = _as_float(value)
    return stats


class AdversarialTrainer:
    """Alternating training of an unconditional GAN: ``generator(z)`` vs ``discriminator(x)``.

    The discriminator returns one raw score per sample (or a score map); the loss kind
    picks the objective. Used by the DCGAN reference; the bi-layer training loop writes
    its own step functions and calls ``alternating_step`` directly.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        *,
        latent_dim: int,
        loss: AdversarialLoss = "non_saturating",
        k_disc: int = 1,
    ) -> None:
        if k_disc < 1:
            raise ValueError(f"k_disc must be >= 1, got {k_disc}")
        self.generator = generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.latent_dim = latent_dim
        self.loss = loss
        self.k_disc = k_disc
        self.d_loss_fn, self.g_loss_fn = adversarial_losses(loss)

    def sample_latent(self, batch_size: int, device: torch.device | str) -> Tensor:
        return torch.randn(batch_size, self.latent_dim, device=device)  # [B, Z]

    def discriminator_step(self, real: Tensor) -> dict[str, Tensor]:
        """One descent step on the discriminator loss (ascent on V for minimax)."""
        with torch.no_grad():
            fake = self.generator(self.sample_latent(real.shape[0], real.device))

        real_scores = self.discriminator(real)
        fake_scores = self.discriminator(fake)
        loss = self.d_loss_fn(real_scores, fake_scores)

        self.d_optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        self.d_optimizer.step()
        return {
            "loss/D/real": loss.real.detach(),
            "loss/D/fake": loss.fake.detach(),
            "loss/D/total": loss.total.detach(),
            "score/real": real_scores.detach().mean(),
            "score/fake": fake_scores.detach().mean(),
        }

    def generator_step(self, real: Tensor) -> dict[str, Tensor]:
        """One descent step on the generator loss; ``real`` feeds relativistic losses."""
        fake = self.generator(self.sample_latent(real.shape[0], real.device))
        fake_scores = self.discriminator(fake)
        real_scores = None
        if self.loss == "rahinge":
            with torch.no_grad():
                real_scores = self.discriminator(real)
        loss = self.g_loss_fn(fake_scores, real_scores)

        self.g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.g_optimizer.step()
        return {"loss/G/adv": loss.detach()}

    def step(self, next_real: Callable[[], Tensor]) -> dict[str, float]:
        """``k_disc`` D steps, each on a fresh real batch, then one G step."""
        real_batches: list[Tensor] = []

        def d_step() -> dict[str, Tensor]:
            real_batches.append(next_real())
            return self.discriminator_step(real_batches[-1])

        def g_step() -> dict[str, Tensor]:
            return self.generator_step(real_batches[-1])

        return alternating_step(
            d_step,
            g_step,
            self.k_disc,
            generator=self.generator,
            discriminator=self.discriminator,
        )
