"""XLA flags for the backend an entry point runs on, set in XLA_FLAGS before JAX starts that backend.

Importing ddjax changes nothing: the entry points (`python -m ddjax.main`, `ddjax.fid`, `ddjax.study`,
`ddjax.benchmark`) call `apply()` first. XLA aborts a process whose XLA_FLAGS names a flag its build does not
know, so a flag is added only for the jaxlib releases known to have it (tests/test_xla_flags.py checks the
installed jaxlib against this table), only for the platform it helps, and never over the user's own value.
"""
import importlib.metadata
import importlib.util
import os

# name -> (value, the platform it helps, the jaxlib releases [first, end) that have it)
FLAGS = {
    # XLA:CPU hands each convolution to YNNPACK by default; XLA's own Eigen kernels run the U-Nets' 3×3
    # convolutions faster on x86 (docs/performance.md), so only dots and reductions stay on YNNPACK.
    'xla_cpu_experimental_ynn_fusion_type': ('individual_dot,reduce', 'cpu', ((0, 10), (0, 13))),
    # XLA:GPU: overlap the data-parallel gradient all-reduce with the rest of the backward pass (NVIDIA's JAX
    # containers set it for the same reason); it changes nothing on one device.
    'xla_gpu_enable_latency_hiding_scheduler': ('true', 'gpu', ((0, 4), (0, 13))),
}


def target_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the backend JAX will start, read without starting it (JAX_PLATFORMS first, else the
  accelerator plugins installed)."""
  requested = os.environ.get('JAX_PLATFORMS', '').split(',')[0].strip().lower()
  if requested:
    return 'gpu' if requested in ('cuda', 'rocm', 'gpu') else requested
  plugins = {entry.name for entry in importlib.metadata.entry_points(group='jax_plugins')}
  if any('cuda' in name or 'rocm' in name for name in plugins):
    return 'gpu'
  return 'tpu' if importlib.util.find_spec('libtpu') else 'cpu'


def jaxlib_release() -> tuple[int, int]:
  major, minor = importlib.metadata.version('jaxlib').split('.')[:2]
  return int(major), int(minor)


def flags_for(platform: str, release: tuple[int, int], user_flags: str) -> list[str]:
  """The `--name=value` flags to add for `platform` on jaxlib `release`, given the user's XLA_FLAGS."""
  return [f'--{name}={value}' for name, (value, helps, (first, end)) in FLAGS.items()
          if helps == platform and first <= release < end and f'--{name}' not in user_flags]


def apply(platform: str | None = None) -> None:
  """Add `flags_for` the target platform to XLA_FLAGS; call before anything starts a JAX backend."""
  user_flags = os.environ.get('XLA_FLAGS', '')
  added = flags_for(platform or target_platform(), jaxlib_release(), user_flags)
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([user_flags, *added]).strip()
