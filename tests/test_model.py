"""Tests of the model, the loss and the estimators exactly as the notebooks define them.

The code under test is loaded from the cells tagged `definitions` of the walkthrough (model, loss, training,
evaluation) and of the companion (the estimators): there is no second copy here.
Oracles are independent of that code: torch.distributions, Monte Carlo, and F.binary_cross_entropy.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

import vae_helpers as vh
from conftest import COMPANION, NOTEBOOK


@pytest.fixture(scope="module")
def nb():
    """The notebooks' definitions: VAE, loss_terms, vae_loss, train_one_epoch, evaluate, importance_weighted_nll..."""
    return vh.load_notebook_definitions(COMPANION, namespace=vh.load_notebook_definitions(NOTEBOOK))


def generators(seed):
    """The training generators, as a TrainingRun holds them."""
    return {"shuffle": torch.Generator().manual_seed(seed), "noise": torch.Generator().manual_seed(seed + 1)}


@pytest.fixture
def model(nb):
    torch.manual_seed(0)
    return nb["VAE"](latent_dim=20)


@pytest.fixture
def images():
    """16 image-like rows: grey levels in [0, 1], a third of them exactly 0 as in MNIST."""
    torch.manual_seed(1)
    return torch.rand(16, 784) * (torch.rand(16, 784) > 0.33)


def test_output_shapes_and_ranges(model, images):
    logits, mu, log_var = model(images)
    assert logits.shape == (16, 784) and mu.shape == (16, 20) and log_var.shape == (16, 20)
    decoded = model.decode(torch.randn(5, 3, 20))  # any leading shape, as the importance sampler uses
    assert decoded.shape == (5, 3, 784) and 0 < decoded.min() and decoded.max() < 1


def test_architecture_and_parameter_count(model):
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")}
    assert shapes == {"enc1.weight": (512, 784), "enc2.weight": (256, 512), "enc_mu.weight": (20, 256),
                      "enc_log_var.weight": (20, 256), "dec1.weight": (256, 20), "dec2.weight": (512, 256),
                      "dec3.weight": (784, 512)}
    assert sum(p.numel() for p in model.parameters()) == 1_082_680


def test_closed_form_kl_matches_monte_carlo(nb):
    torch.manual_seed(2)
    mu, log_var = torch.randn(4, 20), torch.randn(4, 20)
    closed = nb["gaussian_kl"](mu, log_var).sum()
    q = Normal(mu, torch.exp(0.5 * log_var))
    z = q.sample((20000,))
    per_sample = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(dim=(1, 2))
    standard_error = per_sample.std() / math.sqrt(len(per_sample))
    assert abs(closed - per_sample.mean()) < 5 * standard_error
    assert closed == pytest.approx(torch.distributions.kl_divergence(q, Normal(0.0, 1.0)).sum().item(), rel=1e-5)


def test_loss_is_summed_bce_plus_kld(nb, model, images):
    torch.manual_seed(3)
    logits, mu, log_var = model(images)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), images, reduction="sum")
    kld = -0.5 * torch.sum(1 + log_var - mu**2 - torch.exp(log_var))
    recon, kl = nb["loss_terms"](logits, images, mu, log_var)
    assert recon.item() == pytest.approx(bce.item(), rel=1e-5) and kl.item() == pytest.approx(kld.item(), rel=1e-6)
    assert nb["vae_loss"](logits, images, mu, log_var).item() == pytest.approx((bce + kld).item(), rel=1e-5)
    weighted = nb["vae_loss"](logits, images, mu, log_var, beta=4.0)
    assert weighted.item() == pytest.approx((bce + 4 * kld).item(), rel=1e-5)


def test_evaluate_terms_add_up_and_kl_splits_by_dimension(nb, model, images):
    recon, kl = nb["evaluate"](model, images, batch_size=5).tolist()  # uneven batches on purpose
    mu, log_var = model.encode(images)
    whole_batch_kl = nb["gaussian_kl"](mu, log_var).sum().item()
    assert kl == pytest.approx(whole_batch_kl, rel=1e-5)
    per_dimension = nb["kl_per_dimension"](*nb["encode_images"](model, images, batch_size=3))  # uneven batches
    assert per_dimension.shape == (20,) and (per_dimension >= 0).all()
    assert per_dimension.sum().item() * len(images) == pytest.approx(kl, rel=1e-5)
    assert recon > 0


def test_gradients_reach_the_encoder_through_the_sample(nb, model, images):
    torch.manual_seed(4)
    logits, mu, log_var = model(images)
    recon, _ = nb["loss_terms"](logits, images, mu, log_var)
    recon.backward()  # the reconstruction term alone: only the sample z connects it to the encoder
    for name in ("enc1", "enc2", "enc_mu", "enc_log_var"):
        assert getattr(model, name).weight.grad.abs().sum() > 0, name
    mu = torch.zeros(3, 20, requires_grad=True)
    log_var = torch.zeros(3, 20, requires_grad=True)
    torch.manual_seed(5)
    z = model.reparameterize(mu, log_var)
    torch.manual_seed(5)
    eps = torch.randn(3, 20)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones(3, 20)) and torch.allclose(log_var.grad, 0.5 * eps)  # dz/dlogvar


def test_importance_weighted_with_one_sample_is_the_elbo_in_expectation(nb, model, images):
    torch.manual_seed(6)
    repeats = 400
    generator = torch.Generator().manual_seed(6)
    one_sample = torch.stack([nb["importance_weighted_nll"](model, images, 1, generator) for _ in range(repeats)])
    elbo = torch.stack([nb["evaluate"](model, images, 16, seed=r).sum() / len(images) for r in range(repeats)])
    difference = one_sample.mean(dim=1) - elbo  # per repeat; zero in expectation
    assert abs(difference.mean()) < 4 * difference.std() / math.sqrt(repeats)


def test_evaluation_draws_from_its_own_seeded_stream(nb, model, images):
    torch.manual_seed(8)
    global_state = torch.get_rng_state()
    first = nb["evaluate"](model, images, 5, seed=3)
    assert torch.equal(torch.get_rng_state(), global_state)  # training's random stream is not shifted
    assert torch.equal(nb["evaluate"](model, images, 5, seed=3), first)
    assert not torch.equal(nb["evaluate"](model, images, 5, seed=4), first)  # the seed does pick the draws


def test_importance_weighted_bound_is_tighter_than_the_elbo(nb, model, images):
    torch.manual_seed(7)
    elbo_loss = nb["evaluate"](model, images, 16).sum().item() / len(images)
    for k in (10, 100, 1000):
        assert nb["importance_weighted_nll"](model, images, num_samples=k).mean().item() <= elbo_loss, k


def test_training_lowers_the_loss_and_stops_on_a_non_finite_one(nb, model, images):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    streams = generators(0)
    first = nb["train_one_epoch"](model, optimizer, images, 4, streams).sum()
    for _ in range(5):
        last = nb["train_one_epoch"](model, optimizer, images, 4, streams).sum()
    assert last < first
    poisoned = images.clone()
    poisoned[9, 0] = float("nan")  # one bad pixel; which batch it lands in depends on the shuffle
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    bad_batch = int((order == 9).nonzero()) // 4 + 1
    with pytest.raises(FloatingPointError, match=f"epoch 7, batch {bad_batch}\\b"):
        nb["train_one_epoch"](model, optimizer, poisoned, 4, generators(1), epoch=7, check_every=2)
