"""The walkthrough's model, loss, training epoch and evaluation, exactly as its cells tagged `definitions` define
them, against independent oracles: torch.distributions and a float64 numpy BCE."""

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(nb):
    torch.manual_seed(0)
    return nb["VAE"](latent_dim=20)


@pytest.fixture
def images():
    """16 image-like rows: grey levels in [0, 1], a third of them exactly 0 as in MNIST."""
    torch.manual_seed(1)
    return torch.rand(16, 784) * (torch.rand(16, 784) > 0.33)


def test_output_shapes_and_ranges_and_the_reconstruction_term_alone_trains_the_encoder(nb, model, images):
    logits, mu, log_var = model(images)
    assert logits.shape == (16, 784) and mu.shape == log_var.shape == (16, 20)
    decoded = model.decode(torch.randn(5, 3, 20))  # any leading shape, as the importance sampler uses
    assert decoded.shape == (5, 3, 784) and 0 < decoded.min() and decoded.max() < 1
    nb["loss_terms"](logits, images, mu, log_var)[0].backward()  # only the sample z links it to the encoder
    for name in ("enc1", "enc2", "enc_mu", "enc_log_var"):
        assert getattr(model, name).weight.grad.abs().sum() > 0, name


def test_the_reparameterized_sample_passes_gradients_to_mu_and_log_var(model):
    mu, log_var = torch.randn(3, 20, requires_grad=True), torch.randn(3, 20, requires_grad=True)
    z = model.reparameterize(mu, log_var, torch.Generator().manual_seed(5))
    eps = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones(3, 20))
    assert_close(log_var.grad, 0.5 * eps * torch.exp(0.5 * log_var.detach()))  # dz/dlog_var


def test_gaussian_kl_matches_torch_distributions(nb):
    torch.manual_seed(2)
    mu, log_var = 3 * torch.randn(50, 20, dtype=torch.float64), 8 * torch.rand(50, 20, dtype=torch.float64) - 6
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0))
    assert_close(nb["gaussian_kl"](mu, log_var), expected, rtol=1e-12, atol=1e-12)


def test_loss_terms_match_a_float64_bce_and_the_closed_form_kl(nb):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 8, (6, 784))
    logits[:, :4] = [-60.0, 60.0, -30.0, 30.0]  # confident pixels, where a sigmoid in float32 rounds to 0 or 1
    x = rng.random((6, 784)) * (rng.random((6, 784)) > 0.3)
    mu, log_var = rng.normal(size=(6, 20)), rng.normal(size=(6, 20))
    # log sigmoid(l) = -log(1 + e^-l), written stably; BCE = -(x log p + (1 - x) log(1 - p)), summed
    log_p, log_not_p = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)
    expected_recon = -(x * log_p + (1 - x) * log_not_p).sum()
    expected_kl = kl_divergence(Normal(torch.tensor(mu), torch.tensor(np.exp(0.5 * log_var))), Normal(0.0, 1.0)).sum()
    recon, kl = nb["loss_terms"](*(torch.tensor(a, dtype=torch.float32) for a in (logits, x, mu, log_var)))
    assert (recon.item(), kl.item()) == pytest.approx((expected_recon, expected_kl.item()), rel=1e-5)


def test_evaluate_averages_the_terms_of_its_own_seeded_draw(nb, model, images):
    torch.manual_seed(8)
    global_state = torch.get_rng_state()
    first = nb["evaluate"](model, images, 5, seed=3)  # uneven batches on purpose
    assert torch.equal(torch.get_rng_state(), global_state)  # training's random stream is not moved
    assert nb["evaluate"](model, images, 5, seed=3) == first
    assert nb["evaluate"](model, images, 5, seed=4) != first  # the seed picks the draws
    with torch.no_grad():
        logits, mu, log_var = model(images, torch.Generator().manual_seed(3))
        whole = nb["loss_terms"](logits, images, mu, log_var)
    one_batch = nb["evaluate"](model, images, 16, seed=3)
    assert one_batch == pytest.approx([whole[0].item() / 16, whole[1].item() / 16], rel=1e-6)
    assert first[1] == pytest.approx(one_batch[1], rel=1e-5)  # the KL needs no draw: batching changes nothing
