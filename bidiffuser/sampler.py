"""DPM-Solver++ sampling on UniDiffuser's discrete noise schedule.

Conventions (the same as UniDiffuser v1 / EasyGen's BiDiffuser):

* Schedule: Stable Diffusion's "scaled linear" betas, ``linspace(0.00085**0.5, 0.012**0.5, 1000)**2``
  in float64 (:meth:`NoiseSchedule.stable_diffusion`).
* Training timesteps are integers ``n`` in ``1..N`` (N = 1000): ``x_n = sqrt(abar_n) x_0 +
  sqrt(1 - abar_n) eps`` with ``abar_n = prod_{k<=n} (1 - beta_k)``, and the network is called with
  ``n`` itself.  ``n = 0`` means "clean" (``abar_0 = 1``); UniDiffuser feeds ``t = 0`` for a
  modality it conditions on, and ``t = N`` for a modality that is pure noise.
* Sampling runs in continuous time ``t`` in ``[1/N, 1]``.  As in DPM-Solver's "discrete" VP
  schedule, ``log alpha_t`` is interpolated piecewise-linearly between the knots ``t_n = n/N``
  (n = 1..N) where ``alpha_{n/N}^2 = abar_n``.  The network is called with ``t * N``
  (:func:`continuous_to_model_time`), so at the knots it sees exactly its training label ``n``.
* :func:`dpm_solver_pp_sample` integrates the probability-flow ODE with DPM-Solver++ (the solver
  works with the data prediction ``x0 = (x - sigma_t eps) / alpha_t``, the network predicts
  ``eps``).  Its defaults (50 steps, ``t`` from 1 to 1/N uniform in time, singlestep order 3, the
  "fast" order split) reproduce UniDiffuser's ``DPM_Solver(..., predict_x0=True).sample(x,
  steps=50, eps=1/N, T=1.)``.  The only difference is precision: the schedule and all solver
  coefficients are computed here in float64 (UniDiffuser casts its betas to float32).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Union

import torch

__all__ = [
    "DEFAULT_NUM_TIMESTEPS",
    "NoiseSchedule",
    "continuous_to_model_time",
    "dpm_solver_pp_sample",
    "singlestep_orders",
    "stable_diffusion_betas",
]

DEFAULT_NUM_TIMESTEPS = 1000

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[int, int], None]


def stable_diffusion_betas(
    linear_start: float = 0.00085, linear_end: float = 0.012, num_timesteps: int = DEFAULT_NUM_TIMESTEPS
) -> torch.Tensor:
    """UniDiffuser's (and Stable Diffusion's) beta schedule, float64, shape ``(num_timesteps,)``."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def continuous_to_model_time(t, num_timesteps: int = DEFAULT_NUM_TIMESTEPS):
    """The time label the network gets for continuous time ``t``: ``t * N``.

    UniDiffuser's ``model_fn`` calls the U-ViT with ``t_continuous * 1000``, so ``t = 1/N`` is
    label 1 and ``t = 1`` is label 1000 (pure noise); labels between knots are fractional.
    """
    return t * num_timesteps


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through the knots ``(xp, fp)`` (``xp`` increasing).

    Outside ``[xp[0], xp[-1]]`` the first / last segment is extended linearly, as in
    DPM-Solver's ``interpolate_fn``.
    """
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseSchedule:
    """A discrete VP noise schedule with DPM-Solver's continuous-time view of it.

    Attributes (all float64, on the CPU):
        betas: ``(N,)``, ``betas[n-1]`` is beta of training timestep ``n``.
        alphas_cumprod: ``(N,)``, ``alphas_cumprod[n-1] = abar_n = prod_{k<=n} (1 - beta_k)``.
        t_grid: ``(N,)``, the knots ``n / N``, n = 1..N.
        log_alpha_grid: ``(N,)``, ``log alpha`` at the knots, ``0.5 * log(abar_n)``.

    The continuous-time accessors take a Python number or a tensor of any shape.  A floating
    tensor gives a result of its dtype and device; anything else gives a float64 CPU tensor.
    They are meant for ``t`` in ``[1/N, 1]``; outside it the end segments are extended linearly.
    """

    def __init__(self, betas: Union[torch.Tensor, Sequence[float]]):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().reshape(-1)
        if betas.numel() < 2:
            raise ValueError("a noise schedule needs at least 2 timesteps")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie strictly between 0 and 1")
        self.betas = betas
        self.num_timesteps = betas.numel()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.t_grid = torch.arange(1, self.num_timesteps + 1, dtype=torch.float64) / self.num_timesteps
        self.log_alpha_grid = 0.5 * torch.cumsum(torch.log1p(-betas), dim=0)

    @classmethod
    def stable_diffusion(
        cls, linear_start: float = 0.00085, linear_end: float = 0.012, num_timesteps: int = DEFAULT_NUM_TIMESTEPS
    ) -> "NoiseSchedule":
        """The schedule UniDiffuser v1 was trained with (the default everywhere here)."""
        return cls(stable_diffusion_betas(linear_start, linear_end, num_timesteps))

    @property
    def N(self) -> int:
        """The number of discrete timesteps (1000); alias of ``num_timesteps``."""
        return self.num_timesteps

    @property
    def t_min(self) -> float:
        """The smallest time of the continuous schedule, ``1/N`` (UniDiffuser's ``eps``)."""
        return 1.0 / self.num_timesteps

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(N={self.num_timesteps}, beta_1={self.betas[0].item():.6g}, "
            f"beta_N={self.betas[-1].item():.6g})"
        )

    # ---- continuous time (DPM-Solver's "discrete" VP schedule) ----------------------------------

    @staticmethod
    def _as_float64(value):
        """(float64 CPU tensor, a function that puts a result back to the input's dtype/device)."""
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            dtype, device = value.dtype, value.device
            return value.detach().to("cpu", torch.float64), lambda r: r.to(device=device, dtype=dtype)
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", torch.float64), lambda r: r
        return torch.as_tensor(value, dtype=torch.float64), lambda r: r

    def _log_alpha(self, t64: torch.Tensor) -> torch.Tensor:
        return _interp(t64, self.t_grid, self.log_alpha_grid)

    def marginal_log_mean_coeff(self, t):
        """``log alpha_t``, piecewise linear in ``t`` between the knots ``n/N``."""
        t64, back = self._as_float64(t)
        return back(self._log_alpha(t64))

    def marginal_alpha(self, t):
        """``alpha_t`` (the mean coefficient: ``x_t = alpha_t x_0 + sigma_t eps``)."""
        t64, back = self._as_float64(t)
        return back(torch.exp(self._log_alpha(t64)))

    def marginal_std(self, t):
        """``sigma_t = sqrt(1 - alpha_t^2)``."""
        t64, back = self._as_float64(t)
        return back(torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t64))))

    def marginal_lambda(self, t):
        """Half log-SNR ``lambda_t = log alpha_t - log sigma_t`` (decreasing in ``t``)."""
        t64, back = self._as_float64(t)
        log_alpha = self._log_alpha(t64)
        return back(log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha)))

    def inverse_lambda(self, lamb):
        """The ``t`` with ``marginal_lambda(t) == lamb``.

        ``log alpha = -0.5 * log(1 + exp(-2 lambda))``, then ``t`` is read off the same
        piecewise-linear ``(t_n, log alpha_n)`` curve, so the two functions are exact inverses.
        """
        lamb64, back = self._as_float64(lamb)
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lamb64)
        return back(_interp(log_alpha, self.log_alpha_grid.flip(0), self.t_grid.flip(0)))

    # ---- integer training timesteps -----------------------------------------------------------

    def alpha_bar(self, timestep) -> torch.Tensor:
        """``abar_n`` for integer training timesteps ``n`` in ``0..N`` (``abar_0 = 1``), float64 CPU."""
        n = torch.as_tensor(timestep).detach().cpu()
        if n.is_floating_point() or n.is_complex():
            if not bool((n == n.round()).all()):
                raise ValueError("training timesteps must be integers")
        n = n.to(torch.long)
        if n.numel() and (int(n.min()) < 0 or int(n.max()) > self.num_timesteps):
            raise ValueError(f"training timesteps must lie in 0..{self.num_timesteps}, got {n.tolist()}")
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return padded[n]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """``sqrt(abar_n) * x0 + sqrt(1 - abar_n) * noise`` (UniDiffuser's training ``q(x_n | x_0)``).

        ``timestep`` is an int (all samples) or a 1-D integer tensor with one ``n`` per sample
        (``x0.shape[0]``), each in ``1..N`` (0 is allowed and returns ``x0``).
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise shapes differ: {tuple(x0.shape)} vs {tuple(noise.shape)}")
        abar = self.alpha_bar(timestep)
        if abar.dim() == 1:
            if x0.dim() == 0 or abar.shape[0] != x0.shape[0]:
                raise ValueError(
                    f"got {abar.shape[0]} timesteps for a batch of shape {tuple(x0.shape)}; "
                    "pass one timestep per sample"
                )
            abar = abar.reshape(-1, *([1] * (x0.dim() - 1)))
        elif abar.dim() != 0:
            raise ValueError("timestep must be an int or a 1-D tensor")
        a = abar.sqrt().to(device=x0.device, dtype=x0.dtype)
        s = (1.0 - abar).sqrt().to(device=x0.device, dtype=x0.dtype)
        return a * x0 + s * noise

    def sample_timesteps(
        self, batch_size: int, generator: Optional[torch.Generator] = None, device=None
    ) -> torch.Tensor:
        """Uniform integer training timesteps in ``1..N`` (int64), as UniDiffuser's training draws them."""
        n = torch.randint(1, self.num_timesteps + 1, (batch_size,), generator=generator)
        return n.to(device) if device is not None else n


# ---- DPM-Solver++ ---------------------------------------------------------------------------------


def singlestep_orders(steps: int, order: int = 3) -> List[int]:
    """Orders of the singlestep blocks for ``steps`` network evaluations (they sum to ``steps``).

    As DPM-Solver's "fast" split: for order 3, ``K = steps // 3 + 1`` blocks:
    ``[3] * (K - 2) + [2, 1]`` when ``steps % 3 == 0``, else ``[3] * (K - 1) + [steps % 3]``;
    for order 2, ``[2] * (steps // 2)`` plus ``[1]`` when ``steps`` is odd.  A block of order
    ``k`` advances ``k`` intervals of the uniform time grid and uses the grid points it skips as
    its intermediate times (50 steps -> sixteen 3rd-order blocks and one 2nd-order block).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        return [3] * (k - 1) + [steps % 3]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ValueError(f"order must be 1, 2 or 3, got {order}")


def dpm_solver_pp_sample(
    model_fn: ModelFn,
    x: torch.Tensor,
    steps: int = 50,
    schedule: Optional[NoiseSchedule] = None,
    order: int = 3,
    method: str = "singlestep",
    t_start: float = 1.0,
    t_end: Optional[float] = None,
    progress: Optional[ProgressFn] = None,
    lower_order_final: bool = True,
    skip_type: str = "time_uniform",
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``t_start`` to ``t_end`` with DPM-Solver++.

    Args:
        model_fn: ``model_fn(x, t) -> eps``, the noise prediction for ``x`` at continuous time
            ``t`` (a float32 tensor of shape ``(x.shape[0],)`` on ``x.device``, values in
            ``[t_end, t_start]``).  Call the network with ``continuous_to_model_time(t)``.
        x: the start, e.g. ``torch.randn`` noise at ``t_start``; any shape, floating dtype.
        steps: the number of network evaluations (NFE); the time grid has ``steps + 1`` points.
        schedule: defaults to :meth:`NoiseSchedule.stable_diffusion`.
        order: 1, 2 or 3.
        method: ``"singlestep"`` (default, UniDiffuser's ``method='fast'``: blocks from
            :func:`singlestep_orders`, DPM-Solver++ singlestep 2nd/3rd order updates) or
            ``"multistep"`` (DPM-Solver++(2M)/(3M): reuses earlier predictions, warms up with
            lower orders, and with ``lower_order_final`` and fewer than 15 steps lowers the
            order of the last steps).
        t_start, t_end: integration interval; ``t_end`` defaults to ``1/N`` (UniDiffuser's eps).
        progress: optional ``progress(done, total)``, called after each network evaluation with
            ``done`` in ``1..steps`` and ``total = steps``.
        lower_order_final: see ``method`` (multistep only).
        skip_type: spacing of the time grid: ``"time_uniform"`` (default, UniDiffuser's) or
            ``"logSNR"`` (uniform in ``lambda``; DPM-Solver's recommendation).  Uniform ``t`` takes
            large ``lambda`` steps near ``t_end`` (``lambda`` grows like ``-log(t)/2`` there).

    Returns:
        ``x`` at ``t_end`` (the denoised sample), same shape and dtype as the input.

    Deterministic: no randomness inside.  Runs under ``torch.no_grad()``; fine under autocast (the
    model's output is cast back to ``x.dtype`` and the update arithmetic stays in ``x.dtype``).
    """
    schedule = schedule if schedule is not None else NoiseSchedule.stable_diffusion()
    t_end = schedule.t_min if t_end is None else float(t_end)
    t_start = float(t_start)
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    steps = int(steps)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if method not in ("singlestep", "multistep"):
        raise ValueError(f"method must be 'singlestep' or 'multistep', got {method!r}")
    if not 0.0 < t_end < t_start:
        raise ValueError(f"need 0 < t_end < t_start, got t_start={t_start}, t_end={t_end}")
    if skip_type not in ("time_uniform", "logSNR"):
        raise ValueError(f"skip_type must be 'time_uniform' or 'logSNR', got {skip_type!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")

    # Coefficients on the time grid, as Python floats (float64), computed once.
    if skip_type == "time_uniform":
        ts64 = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    else:
        lam_ends = schedule.marginal_lambda(torch.tensor([t_start, t_end], dtype=torch.float64)).tolist()
        ts64 = schedule.inverse_lambda(torch.linspace(lam_ends[0], lam_ends[1], steps + 1, dtype=torch.float64))
        ts64[0], ts64[-1] = t_start, t_end  # exact ends despite the round trip
    log_alpha = schedule.marginal_log_mean_coeff(ts64)
    log_sigma = 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
    ts = ts64.tolist()
    alpha = torch.exp(log_alpha).tolist()
    sigma = torch.exp(log_sigma).tolist()
    lam = (log_alpha - log_sigma).tolist()

    batch_shape = x.shape[:1]
    nfe = 0

    def data_pred(x_i: torch.Tensor, i: int) -> torch.Tensor:
        """x0 prediction at grid point ``i``: ``(x - sigma_i * eps) / alpha_i``."""
        nonlocal nfe
        t_vec = torch.full(batch_shape, ts[i], dtype=torch.float32, device=x_i.device)
        eps = model_fn(x_i, t_vec)
        if eps.shape != x_i.shape:
            raise ValueError(f"model_fn returned shape {tuple(eps.shape)} for input {tuple(x_i.shape)}")
        nfe += 1
        if progress is not None:
            progress(nfe, steps)
        return (x_i - sigma[i] * eps.to(x_i.dtype)) / alpha[i]

    def first_order(x_s: torch.Tensor, d_s: torch.Tensor, s: int, t: int) -> torch.Tensor:
        """DPM-Solver++(1) (= DDIM) from grid point ``s`` to ``t`` with x0 prediction ``d_s``."""
        return (sigma[t] / sigma[s]) * x_s - (alpha[t] * math.expm1(lam[s] - lam[t])) * d_s

    def singlestep_block(x_s: torch.Tensor, s: int, k: int) -> torch.Tensor:
        """One singlestep update of order ``k`` from grid point ``s`` to ``s + k``.

        Intermediate times are the grid points ``s+1`` (and ``s+2``), i.e. ``r1, r2`` are their
        lambda fractions of the block, as UniDiffuser's 'fast' method.
        """
        t = s + k
        d_s = data_pred(x_s, s)
        if k == 1:
            return first_order(x_s, d_s, s, t)
        h = lam[t] - lam[s]
        phi_1 = math.expm1(-h)
        r1 = (lam[s + 1] - lam[s]) / h
        d_1 = data_pred(first_order(x_s, d_s, s, s + 1), s + 1)
        if k == 2:
            return (sigma[t] / sigma[s]) * x_s - (alpha[t] * phi_1) * d_s - (0.5 / r1 * alpha[t] * phi_1) * (d_1 - d_s)
        # k == 3 (DPM-Solver++(3S)): a 2nd-order guess at s+2, then the final update from it.
        r2 = (lam[s + 2] - lam[s]) / h
        phi_12 = math.expm1(-r2 * h)
        phi_22 = phi_12 / (r2 * h) + 1.0
        x_2 = (
            (sigma[s + 2] / sigma[s]) * x_s
            - (alpha[s + 2] * phi_12) * d_s
            + (r2 / r1 * alpha[s + 2] * phi_22) * (d_1 - d_s)
        )
        d_2 = data_pred(x_2, s + 2)
        phi_2 = phi_1 / h + 1.0
        return (sigma[t] / sigma[s]) * x_s - (alpha[t] * phi_1) * d_s + (alpha[t] * phi_2 / r2) * (d_2 - d_s)

    def multistep_update(x_s: torch.Tensor, ds: List[torch.Tensor], idx: List[int], t: int, k: int) -> torch.Tensor:
        """DPM-Solver++ multistep update of order ``k`` to grid point ``t`` from the last ``k``
        x0 predictions ``ds`` made at grid points ``idx``."""
        s = idx[-1]
        h = lam[t] - lam[s]
        phi_1 = math.expm1(-h)
        out = (sigma[t] / sigma[s]) * x_s - (alpha[t] * phi_1) * ds[-1]
        if k == 1:
            return out
        r0 = (lam[s] - lam[idx[-2]]) / h
        d1_0 = (ds[-1] - ds[-2]) / r0
        if k == 2:
            return out - (0.5 * alpha[t] * phi_1) * d1_0
        r1 = (lam[idx[-2]] - lam[idx[-3]]) / h
        d1_1 = (ds[-2] - ds[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return out + (alpha[t] * phi_2) * d1 - (alpha[t] * phi_3) * d2

    with torch.no_grad():
        if method == "singlestep":
            i = 0
            for k in singlestep_orders(steps, order):
                x = singlestep_block(x, i, k)
                i += k
        else:
            ds: List[torch.Tensor] = []
            idx: List[int] = []
            for step in range(1, steps + 1):
                ds, idx = (ds + [data_pred(x, step - 1)])[-order:], (idx + [step - 1])[-order:]
                k = min(order, step)  # warm-up: 1st order first, then 2nd, ...
                if lower_order_final and steps < 15:
                    k = min(k, steps + 1 - step)
                x = multistep_update(x, ds[-k:], idx[-k:], step, k)
    return x
