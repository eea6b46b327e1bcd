"""`--mode eval`: a checkpoint's EMA params -> N samples -> FID and IS against reference statistics, and the
NLL bound in bits/dim on held-out examples; one line appended to `<workdir>/metrics.jsonl`.

The reference (`eval.reference`) is a split of `data.dataset` ('train', 'validation', 'test'), whose statistics
are computed once, from the split resized as training data is, and cached in
`<workdir>/reference_stats_<dataset>_<split>.npz` (recomputed when the weights or image size differ), or the
path of a stats .npz (`python -m ddjax.fid stats`, or an ADM reference batch).
"""
import functools
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ddjax import config as config_lib, data, diffusion, fid, generate, parallel, sample, schedules, train
from ddjax.models import create_model
from ddjax.validation import check

SPLITS = ('train', 'validation', 'test')


def check_reference(config):
  """eval.reference names a split that data.dataset has, or an existing file: checked before sampling."""
  reference, dataset = config.eval.reference, config.data.dataset
  if reference in SPLITS:
    splits = data.prepared_builder(dataset, config.data.data_dir).info.splits
    check(reference in splits, 'eval.reference', reference,
          f'a split of {dataset!r} ({", ".join(map(repr, splits))}) or a stats .npz path')
  else:
    check(os.path.isfile(reference), 'eval.reference', reference, 'an existing stats .npz file, or a split')


def evaluate(config, workdir: str) -> dict:
  """{'step', 'fid', 'is', 'is_std', and 'bpd' for a diffusion model} of the checkpoint, also appended to
  metrics.jsonl; the samples are written to samples/eval_<N>x<H>x<W>x<C>_step<step>.npz (ADM format)."""
  config_lib.validate(config)
  check_reference(config)
  evaluation = config.eval
  weights = fid.weights_path(evaluation.inception_weights)  # before sampling: a missing file fails in seconds
  inception_variables, weights_sha256 = fid.load_variables(weights), fid.sha256_of(weights)
  model = create_model(config)
  betas = schedules.get_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
  params, step = sample.load_ema_params(config, model, workdir, config.sample.checkpoint_step)
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  rng = jax.random.fold_in(jax.random.key(config.seed), step)

  # -- Samples. --------------------------------------------------------------------------------------------------
  generate_fn = generate.make_generate_fn(config, model, betas, mesh)
  images, labels = generate.generate_images(
      generate_fn, params, rng, mesh=mesh, num_samples=evaluation.num_samples,
      batch_size=config.sample.batch_size, num_classes=config.data.num_classes,
      class_label=config.sample.class_label)
  n, h, w, c = images.shape
  samples_path = os.path.join(workdir, 'samples', f'eval_{n}x{h}x{w}x{c}_step{step}.npz')
  if jax.process_index() == 0:
    generate.save_npz(samples_path, images, labels)

  # -- FID and IS. -----------------------------------------------------------------------------------------------
  stats = functools.partial(fid.stats_of, weights_sha256=weights_sha256, mesh=mesh,
                            batch_size=evaluation.batch_size)
  samples = stats(fid.array_batches(images, evaluation.batch_size), inception_variables, source=samples_path)
  reference = reference_stats(config, workdir, inception_variables, stats=stats, weights_sha256=weights_sha256)
  metrics = {'fid': fid.frechet_distance(mu1=samples['mu'], sigma1=samples['sigma'], mu2=reference['mu'],
                                         sigma2=reference['sigma']),
             'is': samples['is_mean'], 'is_std': samples['is_std']}

  # -- NLL. ------------------------------------------------------------------------------------------------------
  if 'gan' not in config and evaluation.bpd_examples:
    metrics['bpd'] = bits_per_dim(config, model, betas, params, mesh=mesh, rng=jax.random.fold_in(rng, 1))

  log = train.MetricLog(workdir)
  log.write(step, metrics)
  log.close()
  train.console(f'eval of step {step}, {n} samples ({config.sample.sampler}, {sampler_steps(config)}) against '
                f'{evaluation.reference}: ' + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items())
                + f'\nsamples in {samples_path}, metrics in {os.path.join(workdir, "metrics.jsonl")}')
  return {'step': step, **metrics}


def sampler_steps(config) -> str:
  if config.sample.step_size is not None:
    return f'step size {config.sample.step_size}'
  return f'{config.sample.num_steps or config.diffusion.num_timesteps} steps'


def reference_stats(config, workdir: str, inception_variables, *, stats, weights_sha256: str) -> dict:
  """The reference statistics of `eval.reference`: a stats file, or a split's statistics (cached)."""
  split, data_config = config.eval.reference, config.data
  if split not in SPLITS:
    return fid.load_stats(split)
  path = os.path.join(workdir, f'reference_stats_{data_config.dataset.replace("/", "_")}_{split}.npz')
  if os.path.exists(path):
    cached = fid.load_stats(path)
    if (cached.get('weights_sha256'), cached.get('image_size')) == (weights_sha256, data_config.image_size):
      return cached
  train.console(f'computing the Inception statistics of {data_config.dataset!r} {split!r} (cached in {path})')
  batches = (images for images, _ in fid.dataset_batches(
      data_config.dataset, split, data_dir=data_config.data_dir, batch_size=config.eval.batch_size,
      image_size=data_config.image_size, num_channels=data_config.num_channels))
  result = stats(batches, inception_variables, source=f'tfds:{data_config.dataset}/{split}',
                 dataset=data_config.dataset, split=split, image_size=data_config.image_size)
  if jax.process_index() == 0:
    fid.save_stats(path, result)
  return result


def bits_per_dim(config, model, betas, params, *, mesh, rng) -> float:
  """Mean −log p(x0) bound in bits/dim (diffusion.bits_per_dim, every timestep) over the first
  `eval.bpd_examples` examples of the test split (validation when there is none); class-conditional models are
  conditioned on the true class. Images are quantised to uint8 as the discretised decoder assumes."""
  data_config, num_classes = config.data, config.data.num_classes
  schedule = schedules.make_schedule(betas)
  splits = data.prepared_builder(data_config.dataset, data_config.data_dir).info.splits
  split = 'test' if 'test' in splits else 'validation'

  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec(parallel.AXIS)))
  def bpd_fn(params, x0, labels, rng):
    def model_fn(x_t, t, y):
      return model.apply({'params': params}, x_t, t, y, train=False)

    return diffusion.bits_per_dim(model_fn, schedule, x0=x0, rng=rng, labels=labels if num_classes else None,
                                  prediction=config.diffusion.prediction, variance=config.diffusion.variance,
                                  clip_x0=config.sample.clip_x0)['bpd']

  batch_size = data_config.batch_size
  params = parallel.global_replicated(mesh, params)
  values = []
  batches = fid.dataset_batches(data_config.dataset, f'{split}[:{config.eval.bpd_examples}]',
                                data_dir=data_config.data_dir, batch_size=batch_size,
                                image_size=data_config.image_size, num_channels=data_config.num_channels)
  for index, (images, labels) in enumerate(batches):
    n = len(images)
    x0 = np.zeros((batch_size,) + images.shape[1:], np.float32)  # the last batch padded
    x0[:n] = images / 127.5 - 1.0
    padded_labels = np.zeros((batch_size,), np.int32)
    padded_labels[:n] = labels
    bpd = bpd_fn(params, parallel.global_sharded(mesh, x0), parallel.global_sharded(mesh, padded_labels),
                 jax.random.fold_in(rng, index))
    values.append(parallel.fetch(bpd)[:n])
  return float(np.mean(np.concatenate(values)))
