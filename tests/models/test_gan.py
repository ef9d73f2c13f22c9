"""The GAN objectives on hand-checkable scores, their gradients, and the alternating update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.gan import (
    ADVERSARIAL_LOSSES,
    AdversarialTrainer,
    adversarial_losses,
    alternating_step,
    expectation,
    feature_matching_loss,
    frozen,
    hinge_discriminator_loss,
    hinge_generator_loss,
    minimax_discriminator_loss,
    minimax_generator_loss,
    minimax_value,
    non_saturating_generator_loss,
    rahinge_discriminator_loss,
    rahinge_generator_loss,
)


def sigmoid(s: float) -> float:
    return 1.0 / (1.0 + math.exp(-s))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


REAL = [math.log(3.0), 0.0, -1.2, 2.5]  # D = 0.75, 0.5, ...
FAKE = [-math.log(3.0), 0.4, -3.0, 1.1]


# ---------------------------------------------------------------------------------------
# Values.
# ---------------------------------------------------------------------------------------


def test_minimax_value_matches_formula() -> None:
    expected = mean([math.log(sigmoid(s)) for s in REAL]) + mean(
        [math.log(1.0 - sigmoid(s)) for s in FAKE]
    )
    assert float(minimax_value(t(REAL), t(FAKE))) == pytest.approx(expected, abs=1e-12)


def test_minimax_value_at_chance_is_minus_log4() -> None:
    # D = 1/2 everywhere (score 0) is the optimum when p_g = p_data: V = -2 log 2.
    value = minimax_value(torch.zeros(7), torch.zeros(5))
    assert float(value) == pytest.approx(-2.0 * math.log(2.0), abs=1e-6)


def test_minimax_discriminator_loss_is_minus_value_split_in_terms() -> None:
    loss = minimax_discriminator_loss(t(REAL), t(FAKE))
    assert float(loss.real) == pytest.approx(mean([-math.log(sigmoid(s)) for s in REAL]))
    assert float(loss.fake) == pytest.approx(mean([-math.log(1.0 - sigmoid(s)) for s in FAKE]))
    assert float(loss.total) == pytest.approx(-float(minimax_value(t(REAL), t(FAKE))))


def test_minimax_is_stable_for_extreme_scores() -> None:
    # Confident and right: V -> 0. Confident and wrong: about -(100 + 100), still finite.
    right = minimax_value(torch.tensor([100.0]), torch.tensor([-100.0]))
    wrong = minimax_value(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert float(right) == pytest.approx(0.0, abs=1e-6)
    assert float(wrong) == pytest.approx(-200.0, rel=1e-5)

    scores = torch.tensor([-100.0, 100.0], requires_grad=True)
    minimax_generator_loss(scores).backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_generator_losses_match_formulas() -> None:
    minimax = mean([math.log(1.0 - sigmoid(s)) for s in FAKE])
    non_saturating = mean([-math.log(sigmoid(s)) for s in FAKE])
    assert float(minimax_generator_loss(t(FAKE))) == pytest.approx(minimax)
    assert float(non_saturating_generator_loss(t(FAKE))) == pytest.approx(non_saturating)
    assert float(hinge_generator_loss(t(FAKE))) == pytest.approx(-mean(FAKE))


def test_hinge_discriminator_loss_matches_formula() -> None:
    loss = hinge_discriminator_loss(t(REAL), t(FAKE))
    assert float(loss.real) == pytest.approx(mean([max(0.0, 1.0 - s) for s in REAL]))
    assert float(loss.fake) == pytest.approx(mean([max(0.0, 1.0 + s) for s in FAKE]))


def test_rahinge_losses_match_formula() -> None:
    real_mean, fake_mean = mean(REAL), mean(FAKE)
    d_real = mean([max(0.0, 1.0 - (s - fake_mean)) for s in REAL])
    d_fake = mean([max(0.0, 1.0 + (s - real_mean)) for s in FAKE])
    g = mean([max(0.0, 1.0 + (s - fake_mean)) for s in REAL]) + mean(
        [max(0.0, 1.0 - (s - real_mean)) for s in FAKE]
    )

    loss = rahinge_discriminator_loss(t(REAL), t(FAKE))
    assert float(loss.real) == pytest.approx(d_real)
    assert float(loss.fake) == pytest.approx(d_fake)
    assert float(rahinge_generator_loss(t(FAKE), t(REAL))) == pytest.approx(g)


def test_rahinge_generator_needs_real_scores() -> None:
    with pytest.raises(ValueError, match="real_scores"):
        rahinge_generator_loss(t(FAKE))


def test_rahinge_averages_over_patch_maps() -> None:
    # Patch score maps [B, 1, H, W]: the average of the other side runs over everything.
    real = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    fake = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    loss = rahinge_discriminator_loss(real, fake)
    assert float(loss.real) == pytest.approx(
        mean([max(0.0, 1.0 - (s - float(fake.mean()))) for s in real.flatten().tolist()]),
        rel=1e-6,
    )


def test_weighted_expectation() -> None:
    values = t([1.0, 2.0, 4.0])
    weights = t([0.0, 1.0, 3.0])
    assert float(expectation(values, weights)) == pytest.approx((2.0 + 12.0) / 4.0)
    assert float(expectation(values)) == pytest.approx(7.0 / 3.0)
    with pytest.raises(ValueError, match="positive"):
        expectation(values, torch.zeros(3, dtype=torch.float64))


def test_weighted_minimax_value_is_an_integral() -> None:
    # Two-point distributions: p_data = (0.25, 0.75), p_g = (0.5, 0.5) on the same points.
    scores = t([0.3, -0.8])
    p_data, p_g = t([0.25, 0.75]), t([0.5, 0.5])
    expected = sum(
        pd * math.log(sigmoid(s)) + pg * math.log(1.0 - sigmoid(s))
        for s, pd, pg in zip([0.3, -0.8], [0.25, 0.75], [0.5, 0.5], strict=True)
    )
    value = minimax_value(scores, scores, real_weight=p_data, fake_weight=p_g)
    assert float(value) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------


def score_gradient(loss_fn, score: float) -> float:  # type: ignore[no-untyped-def]
    scores = torch.tensor([score], dtype=torch.float64, requires_grad=True)
    loss_fn(scores).backward()
    assert scores.grad is not None
    return float(scores.grad[0])


@pytest.mark.parametrize("score", [-6.0, -3.0, -1.0])
def test_non_saturating_gradient_is_stronger_when_d_rejects(score: float) -> None:
    # D(G(z)) small: the minimax loss saturates (gradient -D), the non-saturating one
    # does not (gradient D - 1). Both push the score up (negative gradient of the loss).
    d = sigmoid(score)
    minimax_grad = score_gradient(minimax_generator_loss, score)
    non_saturating_grad = score_gradient(non_saturating_generator_loss, score)

    assert minimax_grad == pytest.approx(-d)
    assert non_saturating_grad == pytest.approx(d - 1.0)
    assert minimax_grad < 0.0 and non_saturating_grad < 0.0
    assert abs(non_saturating_grad) > abs(minimax_grad)
    if score <= -3.0:
        assert abs(non_saturating_grad) > 10.0 * abs(minimax_grad)


def test_discriminator_gradients_separate_real_and_fake() -> None:
    # Descending each D loss raises real scores and lowers fake scores.
    for kind in ADVERSARIAL_LOSSES:
        d_loss_fn, _ = adversarial_losses(kind)  # type: ignore[arg-type]
        real = torch.tensor([0.2, -0.4], requires_grad=True)
        fake = torch.tensor([0.1, 0.5], requires_grad=True)
        d_loss_fn(real, fake).total.backward()
        assert real.grad is not None and fake.grad is not None
        assert (real.grad < 0).all(), kind
        assert (fake.grad > 0).all(), kind


def test_generator_gradients_raise_fake_scores() -> None:
    for kind in ADVERSARIAL_LOSSES:
        _, g_loss_fn = adversarial_losses(kind)  # type: ignore[arg-type]
        fake = torch.tensor([0.1, -0.5], requires_grad=True)
        real = torch.tensor([0.2, 0.4])
        g_loss_fn(fake, real).backward()
        assert fake.grad is not None
        assert (fake.grad < 0).all(), kind


# ---------------------------------------------------------------------------------------
# Feature matching and the selector.
# ---------------------------------------------------------------------------------------


def test_feature_matching_is_mean_l1_and_detaches_real() -> None:
    real = [torch.tensor([1.0, 2.0], requires_grad=True), torch.ones(2, 2, requires_grad=True)]
    fake = [torch.tensor([0.0, 4.0], requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    loss = feature_matching_loss(real, fake)
    assert float(loss.detach()) == pytest.approx(((1.0 + 2.0) / 2.0 + 1.0) / 2.0)

    loss.backward()
    assert all(f.grad is not None for f in fake)
    assert all(r.grad is None for r in real)


def test_feature_matching_rejects_mismatched_features() -> None:
    with pytest.raises(ValueError, match="2 real and 1 fake"):
        feature_matching_loss([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)])
    with pytest.raises(ValueError, match="differs"):
        feature_matching_loss([torch.zeros(2, 3)], [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="at least one"):
        feature_matching_loss([], [])


def test_selector_returns_matching_pairs() -> None:
    assert adversarial_losses("minimax") == (minimax_discriminator_loss, minimax_generator_loss)
    assert adversarial_losses("non_saturating") == (
        minimax_discriminator_loss,
        non_saturating_generator_loss,
    )
    assert adversarial_losses("hinge") == (hinge_discriminator_loss, hinge_generator_loss)
    assert adversarial_losses("rahinge") == (rahinge_discriminator_loss, rahinge_generator_loss)
    with pytest.raises(ValueError, match="rahinge.*got 'wgan'"):
        adversarial_losses("wgan")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Alternating updates.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_alternating_step_runs_k_discriminator_steps_then_one_generator_step(k: int) -> None:
    calls: list[str] = []

    def d_step() -> dict[str, float]:
        calls.append("D")
        return {"loss/D/real": float(len(calls)), "loss/D/fake": 1.0}

    def g_step() -> dict[str, float]:
        calls.append("G")
        return {"loss/G/adv": 5.0}

    stats = alternating_step(d_step, g_step, k)
    assert calls == ["D"] * k + ["G"]
    assert stats == {
        "loss/D/real": mean(list(range(1, k + 1))),
        "loss/D/fake": 1.0,
        "loss/G/adv": 5.0,
    }

    with pytest.raises(ValueError, match=">= 1, got 0"):
        alternating_step(d_step, g_step, 0)
    with pytest.raises(ValueError, match="both"):
        alternating_step(d_step, lambda: {"loss/D/fake": 0.0}, 1)


def small_players() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    discriminator = nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    return generator, discriminator


def test_alternating_step_freezes_the_other_player() -> None:
    generator, discriminator = small_players()
    z = torch.randn(16, 4)
    seen: dict[str, bool] = {}

    def d_step() -> dict[str, torch.Tensor]:
        # Deliberately not detached: the frozen generator must still collect no gradient.
        loss = minimax_discriminator_loss(
            discriminator(torch.ones(16, 1)), discriminator(generator(z))
        ).total
        loss.backward()
        seen["G grads in D step"] = any(p.grad is not None for p in generator.parameters())
        seen["D grads in D step"] = all(p.grad is not None for p in discriminator.parameters())
        discriminator.zero_grad(set_to_none=True)
        return {"loss/D/total": loss}

    def g_step() -> dict[str, torch.Tensor]:
        loss = non_saturating_generator_loss(discriminator(generator(z)))
        loss.backward()
        seen["D grads in G step"] = any(p.grad is not None for p in discriminator.parameters())
        seen["G grads in G step"] = all(p.grad is not None for p in generator.parameters())
        return {"loss/G/adv": loss}

    alternating_step(d_step, g_step, 2, generator=generator, discriminator=discriminator)
    assert seen == {
        "G grads in D step": False,
        "D grads in D step": True,
        "D grads in G step": False,
        "G grads in G step": True,
    }

    # The flags come back afterwards, including a parameter frozen by the caller.
    assert all(p.requires_grad for p in generator.parameters())
    assert all(p.requires_grad for p in discriminator.parameters())
    first = next(generator.parameters())
    first.requires_grad_(False)
    with frozen(generator):
        assert not any(p.requires_grad for p in generator.parameters())
    assert not first.requires_grad
    assert all(p.requires_grad for p in list(generator.parameters())[1:])


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


def make_trainer(kind: str, k_disc: int, lr: float = 1e-3) -> AdversarialTrainer:
    generator, discriminator = small_players()
    return AdversarialTrainer(
        generator,
        discriminator,
        torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999)),
        torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999)),
        latent_dim=4,
        loss=kind,  # type: ignore[arg-type]
        k_disc=k_disc,
    )


@pytest.mark.parametrize("kind", ADVERSARIAL_LOSSES)
def test_trainer_steps_update_only_their_player(kind: str) -> None:
    trainer = make_trainer(kind, k_disc=3)
    real = 3.0 + 0.5 * torch.randn(32, 1)

    g_before, d_before = snapshot(trainer.generator), snapshot(trainer.discriminator)
    trainer.discriminator_step(real)
    assert changed(trainer.discriminator, d_before)
    assert not changed(trainer.generator, g_before)

    g_before, d_before = snapshot(trainer.generator), snapshot(trainer.discriminator)
    trainer.generator_step(real)
    assert changed(trainer.generator, g_before)
    assert not changed(trainer.discriminator, d_before)


def test_trainer_step_calls_discriminator_k_times_per_generator_step() -> None:
    trainer = make_trainer("non_saturating", k_disc=3)
    forwards = {"G": 0, "D": 0, "real batches": 0}
    trainer.generator.register_forward_hook(lambda *_: forwards.__setitem__("G", forwards["G"] + 1))
    trainer.discriminator.register_forward_hook(
        lambda *_: forwards.__setitem__("D", forwards["D"] + 1)
    )

    def next_real() -> torch.Tensor:
        forwards["real batches"] += 1
        return 3.0 + 0.5 * torch.randn(32, 1)

    stats = trainer.step(next_real)

    # Each D step: one fresh real batch, one G sample, D on real and on fake.
    # Then the G step: one G sample, D on fake.
    assert forwards == {"G": 3 + 1, "D": 3 * 2 + 1, "real batches": 3}
    assert set(stats) == {
        "loss/D/real",
        "loss/D/fake",
        "loss/D/total",
        "score/real",
        "score/fake",
        "loss/G/adv",
    }
    assert all(math.isfinite(v) for v in stats.values())


def test_discriminator_steps_ascend_the_minimax_value() -> None:
    trainer = make_trainer("minimax", k_disc=1, lr=1e-2)
    torch.manual_seed(1)
    real = 3.0 + 0.5 * torch.randn(256, 1)
    with torch.no_grad():
        fake = trainer.generator(torch.randn(256, 4))

    def value() -> float:
        with torch.no_grad():
            return float(minimax_value(trainer.discriminator(real), trainer.discriminator(fake)))

    start = value()
    for _ in range(50):
        trainer.discriminator_step(real)
    assert value() > start + 0.1


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two equal-size 1-D samples: mean gap between sorted values."""
    return float((a.flatten().sort().values - b.flatten().sort().values).abs().mean())


@pytest.mark.parametrize("kind", ADVERSARIAL_LOSSES)
def test_alternating_training_moves_generator_to_data(kind: str) -> None:
    # A 1-D GAN: data N(3, 0.5^2), generator starts near 0. 600 rounds (k = 2) of the
    # trainer must bring the generated distribution within a third of its start distance.
    torch.set_num_threads(1)
    trainer = make_trainer(kind, k_disc=2, lr=3e-3)
    torch.manual_seed(0)
    data = 3.0 + 0.5 * torch.randn(2000, 1)
    latent = torch.randn(2000, 4)

    def distance() -> float:
        with torch.no_grad():
            return wasserstein_1d(trainer.generator(latent), data)

    start = distance()
    for _ in range(600):
        stats = trainer.step(lambda: 3.0 + 0.5 * torch.randn(128, 1))
    end = distance()

    assert start > 2.0
    assert end < start / 3.0, f"{kind}: W1 {start:.3f} -> {end:.3f}"
    assert all(math.isfinite(v) for v in stats.values())
