"""Noise schedules: β tables in float64 numpy, and the immutable `Schedule` pytree every other module reads.

Everything derived from β is computed once here in float64 and stored as float32 arrays, so compiled code never
re-derives (or silently down-casts) schedule math. Respacing (IDDPM's SpacedDiffusion) keeps a subset of the
original timesteps, recomputes β from the kept ᾱ, and remembers the original index of every kept step: the
network is always called with the original timestep.
"""
import math

import flax.struct
import jax.numpy as jnp
import numpy as np

from ddjax.validation import check, check_choice, fail

SCHEDULES = ('linear', 'cosine', 'vp', 'geometric')


# ----------------------------------------------------------------------------------------------------------------
# β tables (float64)
# ----------------------------------------------------------------------------------------------------------------

def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
  """ᾱ(u) = cos²(((u + s) / (1 + s)) · π/2), u = t/T ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17, unnormalised)."""
  return np.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def vp_variance(t: np.ndarray, *, beta_min: float, beta_max: float) -> np.ndarray:
  """var(t) = 1 − exp(−½·t²·(β_max − β_min) − t·β_min): the VP-SDE marginal variance (DDGAN's var_func_vp)."""
  return 1.0 - np.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)


def geometric_variance(t: np.ndarray, *, beta_min: float, beta_max: float) -> np.ndarray:
  """var(t) = β_min · (β_max / β_min)^t (DDGAN's var_func_geometric)."""
  return beta_min * (beta_max / beta_min) ** t


def ddgan_time_grid(num_timesteps: int, eps: float = 1e-3) -> np.ndarray:
  """DDGAN's num_timesteps + 1 continuous times in [ε, 1]: t_k = (k / T)·(1 − ε) + ε."""
  return np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps * (1.0 - eps) + eps


def get_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
  """β_1..β_T as float64 numpy for schedule `name`.

  linear:    β from 1e-4·(1000/T) to 0.02·(1000/T), evenly spaced (IDDPM's T-scaled DDPM schedule).
  cosine:    β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta=0.999) with ᾱ = `cosine_alpha_bar` (kwarg `s`, default 0.008).
  vp, geometric: DDGAN's discretisations. ᾱ_k = 1 − var(t_k) on `ddgan_time_grid`; the T transition betas are
             β_k = 1 − ᾱ_k / ᾱ_{k−1}, k = 1..T (kwargs beta_min, beta_max; defaults 0.1, 20 as DDGAN). DDGAN
             prepends β_0 = 1e-8, which only perturbs the data itself and which its posterior drops; the
             network's step k−1 here is DDGAN's pair (x_{k−1}, x_k).
  """
  check_choice('schedule', name, SCHEDULES)
  check(isinstance(num_timesteps, (int, np.integer)) and num_timesteps >= 1, 'num_timesteps', num_timesteps,
        'an integer >= 1')
  if name == 'linear':
    check(num_timesteps > 20, 'num_timesteps', num_timesteps, ">= 21 for 'linear' (β_T = 20/T must stay below 1)")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == 'cosine':
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(u, kwargs.get('s', 0.008))
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], kwargs.get('max_beta', 0.999))
  beta_min, beta_max = kwargs.get('beta_min', 0.1), kwargs.get('beta_max', 20.0)
  variance_fn = vp_variance if name == 'vp' else geometric_variance
  variance = variance_fn(ddgan_time_grid(num_timesteps), beta_min=beta_min, beta_max=beta_max)
  if not np.all((variance > 0) & (variance < 1)):
    fail(f'{name} schedule beta_min/beta_max', (beta_min, beta_max), 'values giving a variance in (0, 1)')
  alpha_bar = 1.0 - variance
  return 1.0 - alpha_bar[1:] / alpha_bar[:-1]


# ----------------------------------------------------------------------------------------------------------------
# Respacing
# ----------------------------------------------------------------------------------------------------------------

SPACINGS = ('even', 'leading', 'trailing')
DEFAULT_SPACING = 'trailing'  # chosen by measurement: docs/performance.md, sampler × spacing × NFE


def spaced_timesteps(num_timesteps: int, *, num_steps: int | None = None, step_size: int | None = None,
                     spacing: str = DEFAULT_SPACING) -> np.ndarray:
  """The kept 0-indexed original timesteps k_0 < … < k_{N−1}, ascending (the chain visits them descending).

  num_steps=N picks a grid by `spacing`:
    'even':     k_i = round(i·(T−1)/(N−1)), the stride accumulated in float and rounded half-to-even, i.e.
                IDDPM's space_timesteps(T, "N") bit for bit: 0 … T−1 for every N (N = 1: k_0 = 0). The grid of
                the published IDDPM / ADM figures (`--timestep_respacing 250`).
    'leading':  k_i = i·⌊T/N⌋ (the DDIM paper's, diffusers' 'leading'): 0 … (N−1)·⌊T/N⌋, so a short chain starts
                well below T−1, from pure noise at a noise level (ᾱ far above ᾱ_T) that is not pure noise.
    'trailing': k_i = round(T − (N−1−i)·T/N) − 1 (diffusers' 'trailing', its float arithmetic kept so the grids
                are its own): T−1 … round(T/N)−1, so every chain starts at T−1. Where diffusers' arange emits an
                N+1-th step (−1, an index past the schedule), only the first N are kept.
  step_size=k: 0, k, 2k, … below T (the seed's step_size). Neither: all T steps.
  """
  if num_steps is not None and step_size is not None:
    fail('num_steps/step_size', (num_steps, step_size), 'at most one of them set')
  if step_size is not None:
    check(1 <= step_size <= num_timesteps, 'step_size', step_size, f'an integer in [1, {num_timesteps}] (T)')
    return np.arange(0, num_timesteps, step_size, dtype=np.int64)
  if num_steps is None:
    return np.arange(num_timesteps, dtype=np.int64)
  check_choice('spacing', spacing, SPACINGS)
  check(1 <= num_steps <= num_timesteps, 'num_steps', num_steps, f'an integer in [1, {num_timesteps}] (T)')
  if spacing == 'leading':
    return np.arange(num_steps, dtype=np.int64) * (num_timesteps // num_steps)
  if spacing == 'trailing':
    descending = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))[:num_steps].astype(np.int64) - 1
    return descending[::-1].copy()
  stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1.0
  position, kept = 0.0, []
  for _ in range(num_steps):
    kept.append(round(position))
    position += stride
  return np.array(kept, dtype=np.int64)


def respace_betas(betas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """β'_i = 1 − ᾱ[k_i] / ᾱ[k_{i−1}] over kept steps k_i (ᾱ before the first kept step is 1), as IDDPM."""
  alpha_bar = np.cumprod(1.0 - np.asarray(betas, np.float64))[timesteps]
  return 1.0 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]])


# ----------------------------------------------------------------------------------------------------------------
# The schedule pytree
# ----------------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class Schedule:
  """Every per-step array of a (possibly respaced) diffusion, float32, indexed by step i = 0..N−1.

  `timesteps[i]` is the original timestep index the network sees at step i.
  """
  timesteps: jnp.ndarray                       # int32 original index of step i
  betas: jnp.ndarray                           # β_i
  alphas_cumprod: jnp.ndarray                  # ᾱ_i
  alphas_cumprod_prev: jnp.ndarray             # ᾱ_{i−1}, with ᾱ_{−1} = 1
  sqrt_alphas_cumprod: jnp.ndarray             # √ᾱ_i
  sqrt_one_minus_alphas_cumprod: jnp.ndarray   # √(1 − ᾱ_i)
  sqrt_recip_alphas_cumprod: jnp.ndarray       # 1/√ᾱ_i
  sqrt_recipm1_alphas_cumprod: jnp.ndarray     # √(1/ᾱ_i − 1)
  posterior_variance: jnp.ndarray              # β̃_i = β_i (1 − ᾱ_{i−1}) / (1 − ᾱ_i)
  posterior_log_variance_clipped: jnp.ndarray  # log β̃_i with β̃_0 replaced by β̃_1 (β̃_0 = 0)
  posterior_mean_coef1: jnp.ndarray            # coefficient of x0 in μ̃: β_i √ᾱ_{i−1} / (1 − ᾱ_i)
  posterior_mean_coef2: jnp.ndarray            # coefficient of x_t in μ̃: (1 − ᾱ_{i−1}) √α_i / (1 − ᾱ_i)
  log_betas: jnp.ndarray                       # log β_i (upper end of learned_range)
  fixed_large_log_variance: jnp.ndarray        # log of (β̃_1, β_1, …, β_{N−1}) (IDDPM fixed_large)

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def make_schedule(betas: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
  """The schedule pytree of β_1..β_N (float64 in, float32 out); `timesteps` defaults to 0..N−1."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    fail('betas', f'array of shape {betas.shape}', 'a 1-D array with 0 < β <= 1')
  timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps)
  alphas = 1.0 - betas
  alpha_bar = np.cumprod(alphas)
  alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
  posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
  # β̃_0 = 0; IDDPM clips its log to β̃_1 (a single-step schedule has nothing better than β_0).
  first = posterior_variance[1] if len(betas) > 1 else betas[0]
  clipped_posterior_variance = np.append(first, posterior_variance[1:])
  arrays = dict(
      betas=betas,
      alphas_cumprod=alpha_bar,
      alphas_cumprod_prev=alpha_bar_prev,
      sqrt_alphas_cumprod=np.sqrt(alpha_bar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alpha_bar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alpha_bar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alpha_bar - 1.0),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(clipped_posterior_variance),
      posterior_mean_coef1=betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar),
      posterior_mean_coef2=(1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar),
      log_betas=np.log(betas),
      fixed_large_log_variance=np.log(np.append(first, betas[1:])),
  )
  assert all(np.all(np.isfinite(a)) for a in arrays.values()), 'non-finite schedule array'
  return Schedule(timesteps=jnp.asarray(timesteps, jnp.int32),
                  **{k: jnp.asarray(v.astype(np.float32)) for k, v in arrays.items()})


def spaced_schedule(betas: np.ndarray, *, num_steps: int | None = None, step_size: int | None = None,
                    spacing: str = DEFAULT_SPACING) -> Schedule:
  """The respaced schedule over `spaced_timesteps` (all steps when neither is set)."""
  timesteps = spaced_timesteps(len(betas), num_steps=num_steps, step_size=step_size, spacing=spacing)
  return make_schedule(respace_betas(betas, timesteps), timesteps)
