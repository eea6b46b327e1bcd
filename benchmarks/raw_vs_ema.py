"""The raw weights against their EMA: `--mode eval`'s samples and metrics from each, at one checkpoint.

Run after training: python benchmarks/raw_vs_ema.py --config configs/digits_ddgan.py --workdir W [--step N]
The EMA row draws the samples `--mode eval` draws (the same keys and labels), so it reproduces its metrics; the raw
row draws them from the same keys with the trained weights (for DDGAN the generator's) in place of the EMA.
"""
import argparse

import jax

from ddjax import checkpoint, config as config_lib, generate, methods, parallel
from ddjax.evaluation import evaluate


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--step', type=int, default=None, help='the checkpoint (default: the newest)')
  args = parser.parse_args(argv)
  config = config_lib.load_config_module(args.config).get_config()
  method = methods.build(config)
  with checkpoint.opened(args.workdir, read_only=True) as manager:
    state = checkpoint.restore(manager, methods.abstract_state(config), args.step)
  step = int(state.step)
  raw = state.params['generator'] if config.method == 'ddgan' else state.params
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  references = evaluate.prepare_scoring(config, mesh=mesh)
  generate_fn = generate.make_generate_fn(method.sample_fn, mesh)
  samples_rng, _ = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step))  # as --mode eval
  print(f'{args.workdir} step {step}, {config.eval.num_samples} samples ({method.sampler})')
  for name, params in (('ema', state.ema_params), ('raw', raw)):
    images, labels = generate.generate_images(
        generate_fn, params, jax.random.fold_in(samples_rng, 0), mesh=mesh, num_samples=config.eval.num_samples,
        batch_size=config.sample.batch_size, num_classes=config.data.num_classes,
        class_label=config.sample.class_label)
    metrics = evaluate.score_samples(config, references, images, labels, mesh=mesh, source=name)
    print(f'{name}: ' + '  '.join(f'{key} {value:.4f}' for key, value in metrics.items()), flush=True)


if __name__ == '__main__':
  main()
