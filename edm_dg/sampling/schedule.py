"""EDM's time-step schedule (Karras et al. 2022, eq. 5), clamped to the network's noise range.

The one schedule of the sampling family: every solver, the NLL's integration
grid and the benchmark's FLOP count take their noise levels from here.
"""

import torch

def step_schedule(num_steps, sigma_min, sigma_max, rho, round_sigma, device=None, dtype=torch.float64):
    """Karras levels t_0 > ... > t_{N-1} (computed in `dtype`, rounded by `round_sigma`) followed by t_N = 0."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t_steps = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

def edm_schedule(net, num_steps, sigma_min=0.002, sigma_max=80, rho=7, device=None, dtype=torch.float64):
    """EDM's noise levels t_0 > ... > t_{N-1} > t_N = 0 for `net`, sigma_min / sigma_max clamped to the net's.

    Returns (device tensor [N+1] in `dtype`, host list of N+1 floats); the host
    copy is made once here, so that a sampling loop takes every decision from
    host floats and never reads the device.
    """
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'num_steps must be an integer >= 2, got {num_steps!r}')
    lo = max(float(sigma_min), float(net.sigma_min))
    hi = min(float(sigma_max), float(net.sigma_max))
    if not 0 < lo < hi:
        raise ValueError(f'need 0 < sigma_min < sigma_max after clamping to the net, got {lo} and {hi}')
    t_dev = step_schedule(int(num_steps), lo, hi, rho, net.round_sigma, device=device, dtype=dtype).to(dtype).reshape(-1)
    return t_dev, [float(v) for v in t_dev.detach().cpu().tolist()]
