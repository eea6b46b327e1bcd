"""How far each deterministic sampler's samples are from the probability-flow ODE's own solution, per network
evaluation: the discretisation error a few-step solver exists to cut, free of the sampling noise an FD has.

Run after training (the digits default: `python -m ddjax.main --config configs/digits.py --workdir W`):
  python benchmarks/ode_error.py --config configs/digits.py --workdir W [--num_samples 256]
      [--samplers ddim,dpm++2m] [--num_steps 5,10,20,50,100] [--spacing trailing] [--reference_steps 1000]
      [--no_clip]

Every sample starts from the same x_T (the per-index keys of `--mode sample`) with the config's labels, guidance
and x0 clipping (`--no_clip`: none, the reference's included, to see what clipping does to the order); DDIM runs
with η = 0. The reference is each sampler at --reference_steps (1000 = every training timestep); their
distance from each other bounds how well the reference itself is converged. Prints, per sampler and number of
steps, the RMS over pixels and samples of x − x_ref in model units ([−1, 1]) and the largest per-sample RMS,
against DPM-Solver++ at the reference steps.
"""
import argparse
import copy

import jax
import jax.numpy as jnp
import numpy as np

from ddjax import config as config_lib, generate, methods, parallel


def draw(config, params, *, sampler: str, num_steps: int, spacing: str, num_samples: int, mesh) -> np.ndarray:
  """float32 samples [N, H, W, C] in model space: sample i from fold_in(key(seed), i), label i mod classes."""
  config = copy.deepcopy(config)
  config.sample.update(sampler=sampler, num_steps=num_steps, spacing=spacing, step_size=None, eta=0.0)
  generate_fn = generate.make_generate_fn(methods.build(config).sample_fn, mesh)
  indices = jnp.arange(num_samples)
  labels = indices % max(config.data.num_classes, 1)
  return np.asarray(generate_fn(params, jax.random.key(config.seed), indices, labels), np.float64)


def rms(samples: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
  """(RMS of samples − reference over everything, the largest per-sample RMS)."""
  per_sample = np.sqrt(np.mean(np.square(samples - reference), axis=(1, 2, 3)))
  return float(np.sqrt(np.mean(np.square(per_sample)))), float(per_sample.max())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_samples', type=int, default=256)
  parser.add_argument('--samplers', default='ddim,dpm++2m')
  parser.add_argument('--num_steps', default='5,10,20,50,100')
  parser.add_argument('--spacing', default='trailing')
  parser.add_argument('--reference_steps', type=int, default=1000)
  parser.add_argument('--no_clip', action='store_true')
  args = parser.parse_args(argv)
  config = config_lib.load_config_module(args.config).get_config()
  config.sample.clip_x0 = config.sample.clip_x0 and not args.no_clip
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  params, step = generate.load_ema_params(config, args.workdir)
  common = dict(spacing=args.spacing, num_samples=args.num_samples, mesh=mesh)
  references = {sampler: draw(config, params, sampler=sampler, num_steps=args.reference_steps, **common)
                for sampler in ('dpm++2m', 'ddim')}
  reference = references['dpm++2m']
  print(f'{args.workdir} step {step}, {args.num_samples} samples, {args.spacing} grid, guidance '
        f'{config.sample.guidance}, clip_x0 {config.sample.clip_x0}; reference: dpm++2m at {args.reference_steps} '
        f'steps (ddim at {args.reference_steps} is {rms(references["ddim"], reference)[0]:.5f} from it)')
  print(f'{"sampler":<10}{"NFE":>6}{"rms":>10}{"max":>10}')
  for sampler in args.samplers.split(','):
    for num_steps in (int(n) for n in args.num_steps.split(',')):
      error, worst = rms(draw(config, params, sampler=sampler, num_steps=num_steps, **common), reference)
      print(f'{sampler:<10}{num_steps:>6}{error:>10.5f}{worst:>10.5f}', flush=True)


if __name__ == '__main__':
  main()
