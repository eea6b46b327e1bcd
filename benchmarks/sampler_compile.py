"""Compile time of each sampler vs number of steps: the loop is one lax.scan, so 1000 steps compile like 10.

Run: python benchmarks/sampler_compile.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddjax import samplers, schedules


def main():
  betas = schedules.get_betas('cosine', 1000)
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 3, 3)) * 0.1

  def model_fn(x_t, t, labels):  # a small conv net stand-in: compile cost independent of the step count
    h = jax.lax.conv_general_dilated(x_t, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.tanh(h + t[:, None, None, None] / 1000.0)

  for sampler in samplers.SAMPLERS:
    for num_steps in (10, 1000):
      timings = []
      for seed in (0, 1):  # first call traces + compiles + runs, second only runs
        start = time.perf_counter()
        np.asarray(samplers.sample(model_fn, betas, shape=(16, 32, 32, 3), rng=jax.random.key(seed),
                                   sampler=sampler, num_steps=num_steps))
        timings.append(time.perf_counter() - start)
      print(f'{sampler:8s} {num_steps:5d} steps: trace+compile {timings[0] - timings[1]:.3f} s, '
            f'run {timings[1]:.3f} s ({jax.default_backend()})')


if __name__ == '__main__':
  main()
