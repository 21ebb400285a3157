"""Tests for bidiffuser.sampler: the discrete noise schedule and DPM-Solver++.

The solver is checked against closed-form answers for Gaussian data x0 ~ N(mu, s^2) (per
coordinate).  With x_t = alpha_t x0 + sigma_t eps:

* Exact noise predictor.  (eps, x_t) are jointly Gaussian with Cov(eps, x_t) = sigma_t and
  Var(x_t) = v_t := alpha_t^2 s^2 + sigma_t^2, so
      E[eps | x_t] = sigma_t (x_t - alpha_t mu) / v_t.
* Exact probability-flow ODE map.  The PF-ODE is dx/dt = f x - g^2/2 * score(x) with
  f = dlog(alpha)/dt, g^2 = d(sigma^2)/dt - 2 f sigma^2 and score = -(x - m_t)/v_t, m_t = alpha_t mu.
  Then dm/dt = f m and dv/dt = 2 f alpha^2 s^2 + d(sigma^2)/dt = 2 f v + g^2, hence
      d(x - m)/dt = (x - m) (f + g^2 / (2 v)) = (x - m) d(log sqrt(v))/dt,
  i.e. z = (x_t - alpha_t mu) / sqrt(v_t) is constant along every trajectory:
      x_{t1} = alpha_{t1} mu + sqrt(v_{t1}) (x_{t0} - alpha_{t0} mu) / sqrt(v_{t0})   (affine).
  At t1 -> 0 this is mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2).  The solver
  stops at t_end = 1/N (as UniDiffuser does), so the tests compare with the map to t_end.
"""

import numpy as np
import pytest
import torch

from bidiffuser.sampler import (
    NoiseSchedule,
    continuous_to_model_time,
    dpm_solver_pp_sample,
    singlestep_orders,
    stable_diffusion_betas,
)

N = 1000
SCHEDULE = NoiseSchedule.stable_diffusion()

# Gaussian data, one (mu, s) per coordinate of a 2x2 "image"; scales like VAE latents / CLIP features.
MU = torch.tensor([[-1.0, 0.5], [1.0, 2.0]], dtype=torch.float64)
S = torch.tensor([[0.8, 1.0], [1.2, 1.5]], dtype=torch.float64)


def _alpha_sigma(t, ndim):
    """alpha_t, sigma_t (float64) for a (B,) time tensor of equal entries, shaped to broadcast
    over (B, ...) (computed once from t[0]: the solver passes one time for the whole batch)."""
    assert bool((t == t[0]).all())
    log_alpha = SCHEDULE.marginal_log_mean_coeff(t[:1].double()).reshape(-1, *([1] * (ndim - 1)))
    alpha = log_alpha.exp()
    return alpha, (1.0 - alpha**2).sqrt()


class GaussianEps:
    """The exact noise predictor for x0 ~ N(mu, s^2); records every call."""

    def __init__(self, mu=MU, s=S):
        self.mu, self.s = mu, s
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        alpha, sigma = _alpha_sigma(t, x.dim())
        v = alpha**2 * self.s**2 + sigma**2
        return (sigma * (x.double() - alpha * self.mu) / v).to(x.dtype)


def exact_map(x_start, t0=1.0, t1=1.0 / N, mu=MU, s=S):
    """The probability-flow ODE solution from t0 to t1 for Gaussian data (see module docstring)."""
    a0, s0 = SCHEDULE.marginal_alpha(t0), SCHEDULE.marginal_std(t0)
    a1, s1 = SCHEDULE.marginal_alpha(t1), SCHEDULE.marginal_std(t1)
    z = (x_start.double() - a0 * mu) / (a0**2 * s**2 + s0**2).sqrt()
    return a1 * mu + (a1**2 * s**2 + s1**2).sqrt() * z


def _noise(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *MU.shape, generator=g, dtype=torch.float64).to(dtype)


# ---- schedule ------------------------------------------------------------------------------------


def test_schedule_matches_numpy_sd_schedule():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(stable_diffusion_betas().numpy(), betas, rtol=1e-13)
    np.testing.assert_allclose(SCHEDULE.betas.numpy(), betas, rtol=1e-13)
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod.numpy(), abar, rtol=1e-12)
    assert SCHEDULE.num_timesteps == SCHEDULE.N == N and SCHEDULE.t_min == pytest.approx(1e-3)
    assert SCHEDULE.alphas_cumprod.dtype == torch.float64
    # abar_N of the SD schedule (known value), i.e. alpha_T ~ 0.068 at t = 1.
    assert abar[-1] == pytest.approx(0.0046600, rel=1e-3)


def test_marginals_at_grid_points_equal_discrete_values():
    n = torch.arange(1, N + 1)
    t = n.double() / N
    abar = SCHEDULE.alphas_cumprod
    torch.testing.assert_close(SCHEDULE.marginal_alpha(t) ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(SCHEDULE.marginal_std(t) ** 2, 1 - abar, rtol=1e-10, atol=0)
    torch.testing.assert_close(SCHEDULE.marginal_log_mean_coeff(t), 0.5 * abar.log(), rtol=1e-12, atol=0)
    lam = SCHEDULE.marginal_lambda(t)
    torch.testing.assert_close(lam, 0.5 * (abar / (1 - abar)).log(), rtol=1e-10, atol=1e-12)
    assert bool((lam[1:] < lam[:-1]).all())  # half log-SNR decreases with t
    # The training label n is the model time of t = n/N.
    assert continuous_to_model_time(1.0 / N) == pytest.approx(1.0)
    assert continuous_to_model_time(1.0) == pytest.approx(1000.0)
    torch.testing.assert_close(continuous_to_model_time(t), n.double())


def test_log_alpha_is_piecewise_linear_between_knots():
    n = torch.arange(1, N).double()
    mid = SCHEDULE.marginal_log_mean_coeff((n + 0.5) / N)
    la = SCHEDULE.log_alpha_grid
    torch.testing.assert_close(mid, 0.5 * (la[:-1] + la[1:]), rtol=1e-12, atol=1e-15)


def test_lambda_inverse_round_trip():
    t = torch.linspace(1.0 / N, 1.0, 7777, dtype=torch.float64)
    lam = SCHEDULE.marginal_lambda(t)
    torch.testing.assert_close(SCHEDULE.inverse_lambda(lam), t, rtol=0, atol=1e-10)
    lam2 = torch.linspace(lam.min().item(), lam.max().item(), 5000, dtype=torch.float64)
    torch.testing.assert_close(SCHEDULE.marginal_lambda(SCHEDULE.inverse_lambda(lam2)), lam2, rtol=0, atol=1e-10)


def test_accessors_keep_dtype_device_and_shape():
    t32 = torch.full((3, 2), 0.5, dtype=torch.float32)
    for fn in (SCHEDULE.marginal_alpha, SCHEDULE.marginal_std, SCHEDULE.marginal_lambda):
        out = fn(t32)
        assert out.dtype == torch.float32 and out.shape == (3, 2)
    assert SCHEDULE.marginal_alpha(0.5).dtype == torch.float64
    assert SCHEDULE.marginal_alpha(1.0).item() ** 2 + SCHEDULE.marginal_std(1.0).item() ** 2 == pytest.approx(1.0)


def test_add_noise_uses_training_convention():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, generator=g)
    noise = torch.randn(3, 4, 2, generator=g)
    n = torch.tensor([1, 500, 1000])
    abar = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[n.numpy() - 1]
    expected = (
        torch.tensor(np.sqrt(abar), dtype=torch.float32)[:, None, None] * x0
        + torch.tensor(np.sqrt(1 - abar), dtype=torch.float32)[:, None, None] * noise
    )
    out = SCHEDULE.add_noise(x0, noise, n)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    # a scalar timestep applies to the whole batch; 0 means clean.
    torch.testing.assert_close(SCHEDULE.add_noise(x0, noise, 500)[1], expected[1])
    torch.testing.assert_close(SCHEDULE.add_noise(x0, noise, 0), x0)
    for bad in (-1, N + 1, torch.tensor([1, 2])):
        with pytest.raises(ValueError):
            SCHEDULE.add_noise(x0, noise, bad)
    ts = SCHEDULE.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert ts.dtype == torch.long and int(ts.min()) >= 1 and int(ts.max()) <= N


# ---- solver bookkeeping --------------------------------------------------------------------------


def test_singlestep_orders_split():
    assert singlestep_orders(50, 3) == [3] * 16 + [2]
    assert singlestep_orders(49, 3) == [3] * 16 + [1]
    assert singlestep_orders(51, 3) == [3] * 16 + [2, 1]
    assert singlestep_orders(3, 3) == [2, 1]
    assert singlestep_orders(7, 2) == [2, 2, 2, 1]
    for order in (1, 2, 3):
        for steps in range(1, 40):
            assert sum(singlestep_orders(steps, order)) == steps


@pytest.mark.parametrize("method,order", [("singlestep", 3), ("singlestep", 2), ("multistep", 2), ("multistep", 3)])
@pytest.mark.parametrize("steps", [1, 2, 5, 14, 20, 50])
def test_nfe_and_time_grid(method, order, steps):
    """steps = number of network calls; calls at the uniform grid 1 -> 1/N (UniDiffuser's points)."""
    model = GaussianEps()
    x = _noise(5)
    done = []
    out = dpm_solver_pp_sample(
        model, x, steps=steps, order=order, method=method, progress=lambda i, total: done.append((i, total))
    )
    assert out.shape == x.shape and out.dtype == torch.float32
    assert len(model.calls) == steps
    assert done == [(i, steps) for i in range(1, steps + 1)]
    grid = torch.linspace(1.0, 1.0 / N, steps + 1, dtype=torch.float64)[:-1]
    got = torch.stack([t[0] for t in model.calls]).double()
    torch.testing.assert_close(got, grid, rtol=0, atol=1e-7)
    for t in model.calls:
        assert t.shape == (5,) and t.dtype == torch.float32 and bool((t == t[0]).all())


def test_deterministic_and_shape_agnostic():
    model = GaussianEps(mu=torch.tensor(0.3, dtype=torch.float64), s=torch.tensor(0.7, dtype=torch.float64))
    for shape in [(64,), (4, 3, 5, 2)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        a = dpm_solver_pp_sample(model, x.clone(), steps=12)
        b = dpm_solver_pp_sample(model, x.clone(), steps=12)
        assert a.shape == x.shape
        assert torch.equal(a, b)


def test_bad_arguments():
    x = _noise(2)
    model = GaussianEps()
    for kwargs in (
        {"steps": 0},
        {"steps": 2.5},
        {"order": 4},
        {"method": "fast"},
        {"t_start": 0.5, "t_end": 0.6},
        {"skip_type": "quadratic"},
    ):
        with pytest.raises(ValueError):
            dpm_solver_pp_sample(model, x, **kwargs)
    with pytest.raises(ValueError):
        dpm_solver_pp_sample(lambda x, t: x[:1], x, steps=3)


def test_runs_under_autocast():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))

    def model(x, t):
        return net(x * (1 + t[:, None])) * 0.1 + x * 0.5

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    ref = dpm_solver_pp_sample(model, x, steps=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dpm_solver_pp_sample(model, x, steps=10)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


# ---- correctness on Gaussian data ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["singlestep", "multistep"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_point_mass_is_solved_exactly(method, order, steps):
    """For data = mu (s = 0) the x0 prediction is constant, so every update is exact (up to the
    float32 time the model is called with, hence atol 1e-6 rather than float64 round-off)."""
    mu = torch.tensor(0.7, dtype=torch.float64)

    def model(x, t):
        alpha, sigma = _alpha_sigma(t, x.dim())
        return ((x.double() - alpha * mu) / sigma).to(x.dtype)

    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = dpm_solver_pp_sample(model, x, steps=steps, order=order, method=method)
    a0, s0 = SCHEDULE.marginal_alpha(1.0), SCHEDULE.marginal_std(1.0)
    a1, s1 = SCHEDULE.marginal_alpha(1.0 / N), SCHEDULE.marginal_std(1.0 / N)
    torch.testing.assert_close(out, a1 * mu + s1 * (x - a0 * mu) / s0, rtol=0, atol=1e-6)


# (method, order, skip_type, steps, tol). Tolerances are about 1.5-2x the measured errors: the max
# over coordinates of |std/s - 1| is 0.72% for the default (UniDiffuser) configuration and 2.1% for
# DPM-Solver++(2M) on the same uniform-t grid, whose last steps are large in lambda.
MOMENT_CASES = [
    ("singlestep", 3, "time_uniform", 50, 0.012),  # UniDiffuser's defaults
    ("singlestep", 3, "time_uniform", 25, 0.03),
    ("multistep", 3, "time_uniform", 50, 0.02),
    ("multistep", 2, "time_uniform", 50, 0.035),
    ("multistep", 2, "logSNR", 25, 0.008),
    ("singlestep", 3, "logSNR", 20, 0.002),
]


@pytest.mark.parametrize("method,order,skip_type,steps,tol", MOMENT_CASES)
def test_gaussian_moments(method, order, skip_type, steps, tol):
    """Sampling 20000 x (2x2) points from the exact start marginal reproduces N(mu, s^2).

    x_T = alpha_T mu + sqrt(v_T) z with z standardized (sample mean 0, std 1 per coordinate), so
    the comparison measures the solver, not Monte-Carlo noise: an exact solver gives mean
    alpha_e mu and std sqrt(v_e) at t_end = 1/N (both within 0.1% of mu and s here).
    """
    z = _noise(20000, torch.float64)
    z = (z - z.mean(0)) / z.std(0)
    a_T, s_T = SCHEDULE.marginal_alpha(1.0), SCHEDULE.marginal_std(1.0)
    x_T = (a_T * MU + (a_T**2 * S**2 + s_T**2).sqrt() * z).float()
    model = GaussianEps()
    out = dpm_solver_pp_sample(model, x_T, steps=steps, order=order, method=method, skip_type=skip_type).double()
    assert ((out.mean(0) - MU).abs() / S).max().item() < max(tol / 2, 0.002)
    assert (out.std(0) / S - 1).abs().max().item() < tol


# Max abs error against the exact map, x_T ~ N(0, I) as UniDiffuser starts: measured at 50 steps
# 0.023 (singlestep 3), 0.044 (multistep 3), 0.070 (multistep 2); at 10 steps 0.20-0.23.
@pytest.mark.parametrize(
    "method,order,tol50", [("singlestep", 3, 0.04), ("multistep", 3, 0.07), ("multistep", 2, 0.1), ("singlestep", 2, 0.03)]
)
def test_matches_exact_ode_map_and_converges(method, order, tol50):
    x_T = _noise(4096)
    exact = exact_map(x_T)
    errs = {}
    for steps in (10, 50):
        out = dpm_solver_pp_sample(GaussianEps(), x_T, steps=steps, order=order, method=method)
        errs[steps] = (out.double() - exact).abs().max().item()
    assert errs[50] < tol50
    assert errs[50] < 0.5 * errs[10]


def _err(method, order, steps, skip_type, dtype=torch.float64):
    x_T = _noise(2048, dtype)
    out = dpm_solver_pp_sample(GaussianEps(), x_T, steps=steps, order=order, method=method, skip_type=skip_type)
    return (out.double() - exact_map(x_T)).abs().max().item()


def test_higher_order_beats_first_order_on_default_grid():
    """At UniDiffuser's 50 uniform-t steps, every higher-order variant is far better than DDIM."""
    e1 = _err("singlestep", 1, 50, "time_uniform")
    for method, order in [("singlestep", 2), ("singlestep", 3), ("multistep", 2), ("multistep", 3)]:
        assert _err(method, order, 50, "time_uniform") < e1 / 2


@pytest.mark.parametrize("method", ["singlestep", "multistep"])
def test_error_ordering_and_convergence_rates(method):
    """On a grid uniform in lambda (where the solvers' step-size theory applies), the error drops
    with the order, and doubling the steps divides it by about 2^order (float64, 1 -> 1/N)."""
    e = {(o, n): _err(method, o, n, "logSNR") for o in (1, 2, 3) for n in (20, 40)}
    for n in (20, 40):
        assert e[(1, n)] > e[(2, n)] > e[(3, n)]
    assert 1.6 < e[(1, 20)] / e[(1, 40)] < 2.5  # first order
    assert e[(2, 20)] / e[(2, 40)] > 3.0  # second order
    assert e[(3, 20)] / e[(3, 40)] > 3.5  # third order (not yet asymptotic at 20 steps)

