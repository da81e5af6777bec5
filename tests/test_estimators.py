"""The companion's estimators, exactly as its cells tagged `definitions` define them (after the walkthrough's),
each against an oracle independent of the code it checks: closed-form values, numerical integration on a grid,
brute-force loops, numpy, torch.distributions. Random quantities: fixed seeds, a few Monte Carlo standard errors."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence
from torch.testing import assert_close

import vae_helpers as vh
from conftest import COMPANION, NOTEBOOK, tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nb():
    """The walkthrough's definitions (VAE, gaussian_kl, ...), then the companion's (elbo_surgery, knn_accuracy, ...)."""
    return vh.load_notebook_definitions(COMPANION, namespace=vh.load_notebook_definitions(NOTEBOOK))


def generator(seed):
    return torch.Generator().manual_seed(seed)


def test_pixel_entropy_known_pixels_and_exact_at_zero_and_one(nb):
    entropy = nb["pixel_entropy"](torch.tensor([[0.0, 1.0, 0.5, 0.25], [0.0, 0.0, 1.0, 1.0]])).tolist()
    assert entropy[0] == pytest.approx(math.log(2) - 0.25 * math.log(0.25) - 0.75 * math.log(0.75), rel=1e-6)
    assert entropy[1:] == [0.0]  # binary pixels: exactly zero, not nan


def test_bce_is_entropy_plus_bernoulli_kl_so_entropy_is_its_floor(nb):
    torch.manual_seed(0)
    x = torch.rand(8, 784) * (torch.rand(8, 784) > 0.3)  # grey levels, a third exactly 0 as in MNIST
    x[:, :50] = 1.0
    entropy = nb["pixel_entropy"](x)
    x_hat = torch.rand(8, 784).clamp(0.01, 0.99)
    assert (F.binary_cross_entropy(x_hat, x, reduction="none").sum(dim=1) >= entropy).all()
    assert F.binary_cross_entropy(x, x, reduction="none").sum(dim=1) == pytest.approx(entropy.tolist(), rel=1e-5)
    inside = torch.rand(8, 784).clamp(0.01, 0.99)  # strictly inside (0, 1), where the Bernoulli KL is finite
    kl = kl_divergence(Bernoulli(probs=inside), Bernoulli(probs=x_hat)).sum(dim=1)
    bce_inside = F.binary_cross_entropy(x_hat, inside, reduction="none").sum(dim=1)
    assert (nb["pixel_entropy"](inside) + kl).tolist() == pytest.approx(bce_inside.tolist(), rel=1e-5)


def test_posterior_means_and_their_variance_across_images(nb):
    """encode_images in uneven batches gives the encoder's means; Burda's statistic is their variance (ddof=0)."""
    model, images = tiny_vae(nb, pixels=784, latent_dim=4), torch.rand(37, 784)
    mu = nb["encode_images"](model, images, batch_size=8)[0]
    assert_close(mu, model.encode(images)[0].detach(), rtol=0, atol=1e-6)
    assert nb["posterior_mean_variance"](mu).tolist() == pytest.approx(np.var(mu.double().numpy(), axis=0), rel=1e-5)


def test_elbo_surgery_far_apart_posteriors_have_mutual_information_log_n(nb):
    torch.manual_seed(2)
    n = 50
    mu = torch.stack([torch.arange(n) % 10 - 4.5, torch.arange(n) // 10 - 2.0], dim=1).float()  # a 10 x 5 grid
    log_var = torch.full((n, 2), math.log(1e-3**2)) + 0.1 * torch.randn(n, 2)  # std ~ 0.001, spacing 1
    result = nb["elbo_surgery"](mu, log_var, 4000, generator(1), chunk=512)
    assert result["mutual_information"] == pytest.approx(math.log(n), abs=4 * result["standard_error"])


def test_elbo_surgery_terms_add_up_and_respect_their_bounds(nb):
    torch.manual_seed(3)
    mu, log_var = torch.randn(300, 5), torch.randn(300, 5) - 1
    result = nb["elbo_surgery"](mu, log_var, 2000, generator(2), chunk=64)
    average_kl = kl_divergence(Normal(mu.double(), torch.exp(0.5 * log_var.double())), Normal(0.0, 1.0)).sum(1).mean()
    assert result["average_kl"] == pytest.approx(average_kl.item(), rel=1e-5)
    assert result["average_kl"] == pytest.approx(result["mutual_information"] + result["marginal_kl"], abs=1e-4)
    # the draws come from the generator alone: same seed, same answer; the global RNG is not touched
    state = torch.get_rng_state()
    assert nb["elbo_surgery"](mu, log_var, 2000, generator(2), chunk=700) == pytest.approx(result, rel=1e-5)
    assert torch.equal(torch.get_rng_state(), state)


def mixture_kls_on_a_grid(mu, log_var, grid, axes):
    """Oracle: (KL(q || p), I(x; z)) for the mixture q = mean_n N(mu_n, diag exp(log_var_n)), trapezoid rule."""
    # I(x; z) as mean_n KL(q_n || q): another formula than the identity the estimator relies on
    log_q_n = Normal(mu.double(), torch.exp(0.5 * log_var.double())).log_prob(grid[..., None, :]).sum(-1)  # (*grid, N)
    log_q = torch.logsumexp(log_q_n, dim=-1) - math.log(len(mu))
    log_p = Normal(0.0, 1.0).log_prob(grid).sum(-1)
    marginal_kl, mutual_information = log_q.exp() * (log_q - log_p), log_q_n.exp() * (log_q_n - log_q[..., None])
    for axis in axes:  # the trapezoid rule along each axis of the grid in turn
        marginal_kl, mutual_information = (torch.trapezoid(v, axis, dim=0) for v in (marginal_kl, mutual_information))
    return marginal_kl.item(), mutual_information.mean().item()


@pytest.mark.parametrize("dims", [1, 2])
def test_elbo_surgery_matches_numerical_integration(nb, dims):
    if dims == 1:  # three overlapping components in 1-D
        mu, log_var = torch.tensor([[-2.0], [0.5], [1.0]]), torch.log(torch.tensor([[0.3], [1.5], [0.05]]))
        axis = torch.linspace(-15, 15, 30001, dtype=torch.float64)
        grid, axes = axis[:, None], [axis]
    else:  # two components in 2-D, with different widths along each axis
        mu, log_var = torch.tensor([[-1.0, 0.5], [1.5, 0.0]]), torch.log(torch.tensor([[0.4, 1.2], [0.8, 0.2]]))
        axis = torch.linspace(-9, 9, 721, dtype=torch.float64)
        grid, axes = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1), [axis, axis]
    marginal_kl, mutual_information = mixture_kls_on_a_grid(mu, log_var, grid, axes)
    result = nb["elbo_surgery"](mu, log_var, 20000, generator(3), chunk=4096)
    slack = 4 * result["standard_error"] + 1e-4
    assert result["marginal_kl"] == pytest.approx(marginal_kl, abs=slack)
    assert result["mutual_information"] == pytest.approx(mutual_information, abs=slack)


def test_importance_weighted_estimate_falls_with_k_on_average(nb):
    """Burda et al. (2016): E[log p_hat_K] does not decrease with K, so the mean estimated NLL does not increase."""
    torch.manual_seed(4)
    model = nb["VAE"](latent_dim=20)
    with torch.no_grad():
        model.enc_log_var.bias.fill_(-3.0)  # a posterior much narrower than the prior: a loose ELBO, clear gaps
    images = torch.rand(4, 784) * (torch.rand(4, 784) > 0.33)
    seeds = range(20)
    means = {k: torch.stack([nb["importance_weighted_nll"](model, images, k, generator=generator(s)).mean()
                             for s in seeds]) for k in (1, 10, 100)}
    assert means[1].mean() >= means[10].mean() >= means[100].mean()
    # K = 1 is a one-sample negative ELBO: its mean is -E_q[log p(x|z) + log p(z) - log q(z|x)] (oracle below)
    with torch.no_grad():
        mu, log_var = model.encode(images)
        q = Normal(mu, torch.exp(0.5 * log_var))
        z = q.sample((4000,))  # (S, 4, 20)
        log_px = Bernoulli(logits=model.decode_logits(z), validate_args=False).log_prob(images).sum(-1)
    negative_elbo = -(log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)).mean(dim=1)  # (S,)
    standard_error = math.hypot(means[1].std() / math.sqrt(len(seeds)), negative_elbo.std() / math.sqrt(len(z)))
    assert abs(means[1].mean() - negative_elbo.mean()) < 4 * standard_error


def test_loss_terms_per_image_match_an_independent_computation(nb):
    """With the posterior's noise switched off, each image's terms are BCE(decode(mu)) and the closed-form KL."""
    torch.manual_seed(12)
    model = nb["VAE"](latent_dim=3)
    with torch.no_grad():
        model.enc_log_var.weight.zero_()
        model.enc_log_var.bias.fill_(-40.0)  # sigma = e^-20: z = mu
    images = torch.rand(7, 784) * (torch.rand(7, 784) > 0.3)
    terms = nb["loss_terms_per_image"](model, images, generator(13), batch_size=3)  # uneven batches
    with torch.no_grad():
        mu, log_var = model.encode(images)
        likelihood = Bernoulli(logits=model.decode_logits(mu), validate_args=False)
        kl = kl_divergence(Normal(mu.double(), torch.exp(0.5 * log_var.double())), Normal(0.0, 1.0)).sum(1)
    assert terms.shape == (7, 2)
    assert terms[:, 0].tolist() == pytest.approx((-likelihood.log_prob(images).sum(1)).tolist(), rel=1e-4)
    assert terms[:, 1].tolist() == pytest.approx(kl.tolist(), rel=1e-4)


def quadrature_gradient(model, x, params):
    """Oracle for a 1-D latent: the exact gradient of sum_b E_q[log p(x_b|z)], integrating over z on a grid."""
    grid = torch.linspace(-12, 12, 4001)
    mu, log_var = model.encode(x)  # (B, 1)
    density = Normal(mu, torch.exp(0.5 * log_var)).log_prob(grid).exp()  # (B, G): carries the gradient
    with torch.no_grad():  # grey-level x: the Bernoulli log-likelihood continued to [0, 1], as the BCE is
        likelihood = Bernoulli(logits=model.decode_logits(grid[:, None]), validate_args=False)
        log_px = likelihood.log_prob(x[:, None, :]).sum(-1)  # (B, G)
    objective = torch.trapezoid(density * log_px, grid, dim=1).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, params)])


def test_both_gradient_estimators_are_unbiased_and_reparameterization_has_lower_variance(nb):
    model = tiny_vae(nb, pixels=4, hidden=5, latent_dim=1)  # a random encoder; a decoder where log p(x|z) varies with z
    with torch.no_grad():
        model.enc_log_var.bias.fill_(-1.0)
        for parameter in (p for layer in (model.dec1, model.dec2, model.dec3) for p in layer.parameters()):
            parameter.zero_()
        model.dec1.weight[:2, 0] = torch.tensor([1.0, -1.0])  # relu(z), relu(-z)
        model.dec2.weight[0, 0] = model.dec2.weight[1, 1] = 1.0
        sign = torch.tensor([1.0, 1.0, -1.0, -1.0])
        model.dec3.weight[:, 0], model.dec3.weight[:, 1] = 3 * sign, -3 * sign  # pixel logits 3 z sign
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.8, 0.0, 0.1], [0.0, 0.0, 1.0, 1.0]])
    params = [p for name in ("enc1", "enc2", "enc_mu", "enc_log_var") for p in getattr(model, name).parameters()]
    exact = quadrature_gradient(model, x, params)
    direction = exact / exact.norm()
    repeats, variances = 1000, {}
    for estimator, seed in (("reparameterization", 5), ("score_function", 6), ("score_function_baseline", 7)):
        samples = nb["encoder_gradient_samples"](model, x, estimator, repeats, generator(seed))
        assert samples.shape == (repeats, exact.numel())
        standard_error = samples.std(dim=0) / math.sqrt(repeats)
        assert (abs(samples.mean(dim=0) - exact) <= 4.5 * standard_error + 1e-6).all(), estimator
        along = samples @ direction  # the component along the true gradient: a sharp test of scale and sign
        assert abs(along.mean() - exact.norm()) < 4 * along.std() / math.sqrt(repeats), estimator
        variances[estimator] = samples.double().var(dim=0).sum().item()  # the trace of the covariance
    assert variances["reparameterization"] < variances["score_function_baseline"] < variances["score_function"]


def test_gradient_samples_cover_the_encoder_only_and_use_the_generator_only(nb):
    torch.manual_seed(7)
    model = nb["VAE"](latent_dim=20)
    x = torch.rand(2, 784)
    state = torch.get_rng_state()
    samples = nb["encoder_gradient_samples"](model, x, "reparameterization", 2, generator(8))
    assert samples.shape == (2, 784 * 512 + 512 + 512 * 256 + 256 + 2 * (256 * 20 + 20))
    assert not torch.equal(samples[0], samples[1])  # a fresh z each repeat
    again = nb["encoder_gradient_samples"](model, x, "reparameterization", 2, generator(8))
    assert torch.equal(samples, again) and torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="estimator"):
        nb["encoder_gradient_samples"](model, x, "reinforce", 1, generator(8))


def test_resampled_total_variance_from_the_gram_matrix_matches_explicit_resamples(nb):
    torch.manual_seed(14)
    samples = torch.randn(9, 6, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 10.0  # far from 0
    gram = nb["centred_gram"](samples)
    assert gram.shape == (9, 9)
    ones = torch.ones(1, 9, dtype=torch.float64)
    assert nb["resampled_total_variance"](gram, ones).item() == pytest.approx(np.trace(np.cov(samples.numpy().T)))
    indices = torch.randint(9, (4, 9))
    counts = torch.stack([torch.bincount(row, minlength=9) for row in indices]).double()
    expected = [np.trace(np.cov(samples[row].numpy().T)) for row in indices]  # the resample, written out
    assert nb["resampled_total_variance"](gram, counts).tolist() == pytest.approx(expected, rel=1e-9)


def test_bootstrap_ratio_interval_is_seeded_and_covers_the_true_ratio(nb):
    """Total variances a factor 4 apart: the 95% interval covers 4 about 95% of the time (loosely: 50 samples each)."""
    torch.manual_seed(15)
    covered, repeats = 0, 200
    for _ in range(repeats):
        gram_a = nb["centred_gram"](2 * torch.randn(50, 5, dtype=torch.float64))
        gram_b = nb["centred_gram"](torch.randn(50, 5, dtype=torch.float64))
        low, high = nb["bootstrap_ratio_interval"](gram_a, gram_b, generator(16), num_resamples=400)
        covered += low <= 4 <= high
    assert 0.85 <= covered / repeats <= 0.99
    state = torch.get_rng_state()
    first = nb["bootstrap_ratio_interval"](gram_a, gram_b, generator(17), num_resamples=400)
    assert nb["bootstrap_ratio_interval"](gram_a, gram_b, generator(17), num_resamples=400) == first
    assert torch.equal(torch.get_rng_state(), state)  # only the generator passed in is used
    ones = torch.ones(1, 50, dtype=torch.float64)
    ratio = (nb["resampled_total_variance"](gram_a, ones) / nb["resampled_total_variance"](gram_b, ones)).item()
    assert first[0] < ratio < first[1]


def test_knn_accuracy_matches_a_brute_force_vote(nb):
    torch.manual_seed(11)
    train_codes, train_labels = torch.randn(200, 3, dtype=torch.float64), torch.randint(4, (200,))
    test_codes, test_labels = torch.randn(57, 3, dtype=torch.float64), torch.randint(4, (57,))
    k, correct = 5, 0
    for code, label in zip(test_codes.tolist(), test_labels.tolist()):
        order = sorted(range(200), key=lambda i: math.dist(code, train_codes[i].tolist()))[:k]
        neighbour_labels = [train_labels[i].item() for i in order]
        counts = Counter(neighbour_labels)  # the tie rule: the nearest of the most voted labels
        predicted = next(lab for lab in neighbour_labels if counts[lab] == max(counts.values()))
        correct += predicted == label
    assert nb["knn_accuracy"](train_codes, train_labels, test_codes, test_labels, k=k, chunk=10) == correct / 57


def test_kl_from_the_prior_splits_at_the_moment_matched_gaussian(nb):
    """KL(q || p) = KL(q || N(m, S)) + KL(N(m, S) || p) for Gaussian p, on a 1-D mixture integrated on a grid."""
    # so the moment-matched bound lies below KL(q || p), and no Gaussian prior gains more
    mu, log_var = torch.tensor([[-2.0], [0.5], [1.0]]), torch.log(torch.tensor([[0.3], [1.5], [0.05]]))
    axis = torch.linspace(-15, 15, 30001, dtype=torch.float64)
    marginal_kl, _ = mixture_kls_on_a_grid(mu, log_var, axis[:, None], [axis])
    mean, covariance = nb["aggregate_posterior_moments"](mu, log_var)
    log_q = torch.logsumexp(Normal(mu.double().T, torch.exp(0.5 * log_var.double().T)).log_prob(axis[:, None]), 1)
    log_q = log_q - math.log(3)
    log_gauss = Normal(mean.double(), covariance.double().sqrt()[0]).log_prob(axis)
    kl_to_gaussian = torch.trapezoid(log_q.exp() * (log_q - log_gauss), axis).item()
    bound = nb["gaussian_kl_from_standard_normal"](mean, covariance)
    assert kl_to_gaussian + bound == pytest.approx(marginal_kl, abs=1e-5)
    assert 0 < bound < marginal_kl  # strictly below: a mixture of separated bumps is not Gaussian


def test_the_bound_stays_below_the_average_kl_for_codes_at_the_prior(nb):
    g = generator(19)  # a collapsed run: every q(z|x) within 1e-4 of N(0, I)
    mu, log_var = 1e-4 * torch.randn(10_000, 20, generator=g), 1e-4 * torch.randn(10_000, 20, generator=g)
    average_kl = nb["gaussian_kl"](mu.double(), log_var.double()).sum(dim=1).mean().item()  # >= KL(q(z) || p(z))
    bound = nb["gaussian_kl_from_standard_normal"](*nb["aggregate_posterior_moments"](mu, log_var))
    assert 0 <= bound <= average_kl


def test_moment_matched_kl_bias_for_gaussian_codes(nb):
    """Codes mu ~ N(0, I), ~zero posterior variance: KL(q(z) || p(z)) is 0, so the plug-in's mean is its bias."""
    # Oracle: the exact Wishart expectation, E[log det S_hat] = sum_i digamma((N - i) / 2) + J log(2 / N), and
    # E[tr S_hat] + E[|m_hat|^2] = J, so E[plug-in] = -(1/2)(sum_i digamma((N - i) / 2) + J log(2 / N)).
    latent_dim, n = 4, 200
    digammas = torch.special.digamma(torch.tensor([(n - i) / 2 for i in range(1, latent_dim + 1)], dtype=torch.float64))
    exact = -0.5 * (digammas.sum().item() + latent_dim * math.log(2 / n))
    assert exact == pytest.approx(latent_dim * (latent_dim + 3) / (4 * n), rel=0.05)  # the notebook's J(J+3)/(4N)
    g, log_var = generator(19), torch.full((n, latent_dim), math.log(1e-8))
    plug_ins, biases = [], []
    for repeat in range(300):
        mu = torch.randn(n, latent_dim, generator=g, dtype=torch.float64)
        plug_ins.append(nb["gaussian_kl_from_standard_normal"](*nb["aggregate_posterior_moments"](mu, log_var)))
        if repeat < 40:
            biases.append(nb["moment_matched_kl_bias"](mu, log_var, 100, g))
    plug_ins, biases = torch.tensor(plug_ins), torch.tensor(biases)
    assert abs(plug_ins.mean() - exact) < 4 * plug_ins.std() / math.sqrt(len(plug_ins))
    assert biases.mean().item() == pytest.approx(exact, rel=0.25)  # the bootstrap recovers the bias, roughly
