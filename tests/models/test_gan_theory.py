"""The GAN theory checked numerically on 1-D densities, by quadrature (no sampling).

For a fixed generator density p_g, the discriminator that maximises
V(D) = E_{p_data}[log D] + E_{p_g}[log(1 - D)] is D* = p_data / (p_data + p_g), and
V(D*) = 2 JS(p_data || p_g) - 2 log 2. A flexible logistic discriminator (bias, linear,
quadratic and 49 Gaussian-bump features) is fitted with L-BFGS on the library's minimax
discriminator loss, with the expectations written as integrals on a fine grid
(trapezoid weights times the densities). The fit is a convex problem, so it converges
to the same optimum every run; the Jensen-Shannon divergence is computed independently
with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from models.gan import minimax_discriminator_loss, minimax_value

# Tolerances; the observed worst errors are 0.0025 for D and about 1e-6 for V.
D_TOLERANCE = 0.01  # max |D - D*| where p_data + p_g > DENSITY_FLOOR
DENSITY_FLOOR = 1e-3  # below this the objective barely constrains D (tails)
V_TOLERANCE = 1e-3  # |V(fitted D) - (2 JS - 2 log 2)|

GRID = np.linspace(-9.0, 9.0, 3601)  # [N], spacing 0.005
LOG4 = 2.0 * math.log(2.0)


def normal_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2.0 * math.pi))


def trapezoid_weights(x: np.ndarray) -> np.ndarray:
    weights = np.full_like(x, x[1] - x[0])
    weights[0] *= 0.5
    weights[-1] *= 0.5
    return weights


def js_divergence(p: np.ndarray, q: np.ndarray, weights: np.ndarray) -> float:
    """JS(p || q) = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2, in nats."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        safe = a > 0
        return float(np.sum(weights[safe] * a[safe] * np.log(a[safe] / b[safe])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@dataclass
class FittedDiscriminator:
    features: torch.Tensor  # [N, F]
    theta: torch.Tensor  # [F]
    real_weight: torch.Tensor  # [N] quadrature weight x p_data
    fake_weight: torch.Tensor  # [N] quadrature weight x p_g

    def logits(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        return self.features @ (self.theta if theta is None else theta)  # [N]

    def value(self, logits: torch.Tensor) -> float:
        # The grid points are both the "real" and the "generated" samples; only the
        # weights (the two densities) differ.
        return float(
            minimax_value(
                logits, logits, real_weight=self.real_weight, fake_weight=self.fake_weight
            )
        )


def grid_features(x: torch.Tensor) -> torch.Tensor:
    centres = torch.linspace(-6.0, 6.0, 49, dtype=x.dtype)  # [K]
    width = float(centres[1] - centres[0])
    bumps = torch.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)  # [N, K]
    scaled = x[:, None] / 3.0  # [N, 1]
    return torch.cat([torch.ones_like(scaled), scaled, scaled**2, bumps], dim=1)  # [N, K+3]


def fit_discriminator(p_data: np.ndarray, p_g: np.ndarray) -> FittedDiscriminator:
    """Maximise V over the logistic model by minimising the library's D loss (= -V)."""
    torch.set_num_threads(1)
    x = torch.from_numpy(GRID)
    weights = torch.from_numpy(trapezoid_weights(GRID))
    real_weight = weights * torch.from_numpy(p_data)
    fake_weight = weights * torch.from_numpy(p_g)
    features = grid_features(x)

    # Start away from the optimum (a random discriminator), seeded.
    generator = torch.Generator().manual_seed(0)
    theta = 0.5 * torch.randn(features.shape[1], generator=generator, dtype=x.dtype)
    theta.requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = features @ theta  # [N]
        loss = minimax_discriminator_loss(
            logits, logits, real_weight=real_weight, fake_weight=fake_weight
        ).total
        loss.backward()
        return loss

    optimiser.step(closure)
    return FittedDiscriminator(features, theta.detach(), real_weight, fake_weight)


Densities = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

CASES: dict[str, Densities] = {
    # Bimodal data against a single broad Gaussian: log(p_data / p_g) is not quadratic.
    "mixture_vs_gaussian": lambda x: (
        0.5 * normal_pdf(x, -2.0, 0.7) + 0.5 * normal_pdf(x, 2.0, 0.7),
        normal_pdf(x, 0.5, 1.5),
    ),
    "shifted_gaussians": lambda x: (normal_pdf(x, 0.0, 1.0), normal_pdf(x, 1.5, 1.0)),
    "narrow_vs_wide": lambda x: (normal_pdf(x, 0.0, 0.6), normal_pdf(x, 0.3, 2.0)),
}


@pytest.fixture(scope="module", params=sorted(CASES), ids=sorted(CASES))
def fitted(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray, FittedDiscriminator]:
    p_data, p_g = CASES[request.param](GRID)
    return p_data, p_g, fit_discriminator(p_data, p_g)


def test_optimal_discriminator_is_density_ratio(
    fitted: tuple[np.ndarray, np.ndarray, FittedDiscriminator],
) -> None:
    p_data, p_g, disc = fitted
    d_fitted = torch.sigmoid(disc.logits()).numpy()
    d_star = p_data / (p_data + p_g)

    support = (p_data + p_g) > DENSITY_FLOOR
    error = np.abs(d_fitted - d_star)[support]
    assert error.max() < D_TOLERANCE, f"max |D - D*| = {error.max():.4f}"


def test_optimal_value_is_jensen_shannon(
    fitted: tuple[np.ndarray, np.ndarray, FittedDiscriminator],
) -> None:
    p_data, p_g, disc = fitted
    js = js_divergence(p_data, p_g, trapezoid_weights(GRID))
    expected = 2.0 * js - LOG4

    value = disc.value(disc.logits())
    assert abs(value - expected) < V_TOLERANCE, f"V = {value:.5f}, 2 JS - 2 log 2 = {expected:.5f}"

    # The distributions differ, so the optimum lies strictly above the global minimum.
    assert js > 0.01
    assert value > -LOG4 + 0.01


def test_optimum_is_a_maximum(
    fitted: tuple[np.ndarray, np.ndarray, FittedDiscriminator],
) -> None:
    _, _, disc = fitted
    best = disc.value(disc.logits())
    x = torch.from_numpy(GRID)

    # Perturb the fitted logits directly: shifts and a wiggle.
    perturbed = [
        disc.logits() + 0.3,
        disc.logits() - 0.3,
        disc.logits() + 0.3 * torch.sin(2.0 * x),
    ]

    # Perturb the parameters along random directions, both signs.
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        direction = torch.randn(disc.theta.shape, generator=generator, dtype=disc.theta.dtype)
        direction = 0.1 * direction / direction.norm()
        perturbed.append(disc.logits(disc.theta + direction))
        perturbed.append(disc.logits(disc.theta - direction))

    for index, logits in enumerate(perturbed):
        value = disc.value(logits)
        assert value < best - 1e-6, f"perturbation {index}: V = {value:.6f} >= optimum {best:.6f}"


def test_equal_distributions_give_half_and_minus_log4() -> None:
    p = 0.3 * normal_pdf(GRID, -1.0, 0.8) + 0.7 * normal_pdf(GRID, 1.0, 1.2)
    disc = fit_discriminator(p, p.copy())
    d_fitted = torch.sigmoid(disc.logits()).numpy()

    support = (2.0 * p) > DENSITY_FLOOR
    assert np.abs(d_fitted - 0.5)[support].max() < D_TOLERANCE

    value = disc.value(disc.logits())
    assert abs(value - (-LOG4)) < V_TOLERANCE, f"V = {value:.5f}, expected -2 log 2 = {-LOG4:.5f}"
    assert abs(js_divergence(p, p, trapezoid_weights(GRID))) < 1e-12
