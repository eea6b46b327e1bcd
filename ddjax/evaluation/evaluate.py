"""`--mode eval`: a checkpoint's EMA params -> N samples -> FID and IS against reference statistics, and the
NLL bound in bits/dim on held-out examples; one line appended to `<workdir>/metrics.jsonl`.

Order: the checkpoint, the Inception weights, the reference statistics, and only then the samples, so whatever is
missing fails before hours of sampling. `--mode sweep` scores its cells with the same two functions,
prepare_scoring (before sampling) and score_samples.

The reference (`eval.reference`) is a split of `data.dataset` ('train', 'validation', 'test') or the path of a
stats .npz (`python -m ddjax.fid stats`, or an ADM reference batch). A split's statistics are computed once,
streaming the split resized as training data is, and cached in `eval.cache_dir` (None: ~/.cache/ddjax), shared by
every workdir, as `reference_<dataset>_<split>_<H>x<W>x<C>_n<count>_<key>.npz`: `key` hashes its provenance
(fid.dataset_provenance: dataset, version, split, data_dir, size, channels, count, weights sha256), which is also
stored in the file and compared on reading; a file whose provenance differs is recomputed, never reused.

Resumable: the samples are drawn in chunks of whole sample batches (CHUNK_SAMPLES rounded up), chunk i from
fold_in(rng, i) with its own labels, each saved (atomically) as `<workdir>/samples/eval_chunks_step<step>_<key>/
chunk<i>_<size>.npz`, `key` a hash of every setting the samples depend on. A rerun, after a kill or not, reads
the chunks there and draws only the missing ones; changed settings get another directory. All samples are also
written as `samples/eval_<N>x<H>x<W>x<C>_step<step>.npz` (ADM format: arr_0 uint8 images, arr_1 labels).

Multi-host: every process runs all of it (each batch spans all hosts' devices) and gets the same statistics; only
process 0 writes files, and a cached file is used only when every process can read it.
"""
import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ddjax import config as config_lib, data, generate, image_files, methods, parallel, reporting
from ddjax.evaluation import fid, offline_metrics
from ddjax.validation import check

SPLITS = ('train', 'validation', 'test')
CHUNK_SAMPLES = 5000  # samples per resumable chunk, rounded up to whole sample.batch_size batches


def check_reference(config):
  """eval.reference names a split that data.dataset has, or an existing file: checked before sampling (the
  dataset, when needed, checked by data.check_prepared)."""
  reference, dataset = config.eval.reference, config.data.dataset
  if reference in SPLITS:
    splits = dataset_splits(config)
    check(reference in splits, 'eval.reference', reference,
          f'a split of {dataset!r} ({", ".join(map(repr, splits))}) or a stats .npz path')
  else:
    check(os.path.isfile(reference), 'eval.reference', reference, 'an existing stats .npz file, or a split')


def check_nll_split(config, method):
  """The NLL, when measured, has a held-out split."""
  check(not measures_nll(config, method) or {'test', 'validation'} & set(dataset_splits(config)),
        'eval.bpd_examples', config.eval.bpd_examples,
        f'0: {config.data.dataset!r} has no test or validation split for the NLL')


def dataset_splits(config) -> list[str]:
  return list(data.prepared_builder(config.data.dataset, config.data.data_dir).info.splits)


def measures_nll(config, method) -> bool:
  return method.nll_fn is not None and config.eval.bpd_examples > 0


def evaluate(config, workdir: str) -> dict:
  """{'step', 'fid', 'is', 'is_std', and 'bpd' for a diffusion model} of the checkpoint, also appended to
  metrics.jsonl; the samples are written to samples/eval_<N>x<H>x<W>x<C>_step<step>.npz (ADM format)."""
  config_lib.validate(config)
  data.check_prepared(config, 'eval')
  method = methods.build(config)
  check_nll_split(config, method)
  params, step = generate.load_ema_params(config, workdir, config.sample.checkpoint_step)
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  samples_rng, bpd_rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step))
  references = prepare_scoring(config, mesh=mesh)

  # -- Samples, chunk by chunk. ----------------------------------------------------------------------------------
  generate_fn = generate.make_generate_fn(method.sample_fn, mesh)
  images, labels = draw_samples(config, workdir, generate_fn, params, samples_rng, mesh=mesh, step=step)
  n, h, w, c = images.shape
  samples_path = os.path.join(workdir, 'samples', f'eval_{n}x{h}x{w}x{c}_step{step}.npz')
  if jax.process_index() == 0:
    image_files.save_npz(samples_path, {'arr_0': images, 'arr_1': labels})

  # -- FID and IS; the offline metrics. --------------------------------------------------------------------------
  metrics = score_samples(config, references, images, labels, mesh=mesh, source=samples_path)
  if 'offline' in references:
    feature_net = references['offline'][0]
    histogram = offline_metrics.class_histogram(feature_net.predict(images), feature_net.model.num_classes)
    reporting.console('classes of the samples (the feature classifier\'s labels): '
                      + ' '.join(f'{c}:{n}' for c, n in enumerate(histogram)))

  # -- NLL. ------------------------------------------------------------------------------------------------------
  if measures_nll(config, method):
    metrics['bpd'] = bits_per_dim(config, method.nll_fn, params, mesh=mesh, rng=bpd_rng)
  elif method.nll_fn is None:
    reporting.console(f'bits/dim skipped: the {config.method} method has no likelihood')

  log = reporting.MetricLog(workdir)
  log.write(step, metrics)
  log.close()
  reporting.console(f'eval of step {step}, {n} samples ({method.sampler}): '
                + '  '.join(f'{k} {v:.4f}' for k, v in metrics.items())
                + f'\nsamples in {samples_path}, metrics in {os.path.join(workdir, "metrics.jsonl")}')
  return {'step': step, **metrics}


def prepare_scoring(config, *, mesh) -> dict:
  """What the metrics of eval.metrics need, prepared before any sampling (a bad eval.reference or a missing
  weights file fails in seconds): {'inception': (Inception variables, weights sha256, reference statistics)} for
  FID/IS, {'offline': (feature network, real reference)} for the offline metrics."""
  check_reference(config)
  references = {}
  weights = inception_weights(config)
  if weights:
    variables, weights_sha256 = fid.load_variables(weights), fid.sha256_of(weights)
    references['inception'] = (variables, weights_sha256,
                                reference_stats(config, variables, mesh=mesh, weights_sha256=weights_sha256))
  if uses_offline_metrics(config, weights):
    references['offline'] = offline_reference(config)
  return references


def score_samples(config, references: dict, images: np.ndarray, labels: np.ndarray, *, mesh, source: str) -> dict:
  """{'fid', 'is', 'is_std'} and the offline metrics (offline_metrics.score; agreement for a class-conditional
  model), as `references` (prepare_scoring) has them, of uint8 samples [N, H, W, C] with their requested labels;
  `source` (the samples' file) goes into the Inception statistics' provenance."""
  metrics = {}
  if 'inception' in references:
    variables, weights_sha256, reference = references['inception']
    batch_size = config.eval.batch_size
    samples = fid.stats_of(fid.array_batches(images, batch_size), variables, mesh=mesh, batch_size=batch_size,
                           with_inception_score=True, source=source, weights_sha256=weights_sha256)
    metrics.update(fid=fid.frechet_distance(mu1=samples['mu'], sigma1=samples['sigma'], mu2=reference['mu'],
                                            sigma2=reference['sigma']),
                   **{'is': samples['is_mean'], 'is_std': samples['is_std']})
  if 'offline' in references:
    feature_net, real = references['offline']
    metrics.update(offline_metrics.score(images, labels if config.data.num_classes else None, net=feature_net,
                                         real=real))
  return metrics


def inception_weights(config) -> str | None:
  """The Inception weights file when eval.metrics asks for FID/IS: InceptionWeightsError when they are needed and
  missing, None with a console note when eval.metrics='auto' and they cannot be had (the offline metrics then)."""
  if config.eval.metrics == 'offline':
    return None
  try:
    return fid.weights_path(config.eval.inception_weights)
  except fid.InceptionWeightsError as error:
    if config.eval.metrics != 'auto':
      raise
    reporting.console(f'FID/IS skipped, the offline metrics instead (eval.metrics=\'auto\'): {error}')
    return None


def uses_offline_metrics(config, weights: str | None) -> bool:
  return config.eval.metrics in ('offline', 'both') or (config.eval.metrics == 'auto' and not weights)


def offline_reference(config):
  """(the feature classifier of data.dataset, trained once and cached in eval.cache_dir; its real reference)."""
  data_config = config.data
  kwargs = dict(data_dir=data_config.data_dir, image_size=data_config.image_size,
                num_channels=data_config.num_channels)
  net = offline_metrics.load_or_train(data_config.dataset, cache_dir=config.eval.cache_dir, seed=config.seed,
                                      **kwargs)
  reporting.console(f'offline metrics: a feature classifier of {data_config.dataset!r} (held-out accuracy '
                f'{net.accuracy:.4f})')
  return net, offline_metrics.real_reference(data_config.dataset, net=net, **kwargs)


def on_every_process(flag: bool) -> bool:
  """`flag` and-ed over the processes. Each process looks at its own file system, and all must take the same
  branch: drawing a chunk or computing statistics runs on every host's devices at once."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


# -- Reference statistics. -------------------------------------------------------------------------------------

def reference_stats(config, inception_variables, *, mesh, weights_sha256: str) -> dict:
  """The statistics of `eval.reference`: a stats file, or a split's, from the cache when its provenance matches
  (see the module doc), else computed by streaming the split and cached."""
  split, data_config = config.eval.reference, config.data
  if split not in SPLITS:
    return fid.load_stats(split)
  provenance = fid.dataset_provenance(data_config.dataset, split, data_dir=data_config.data_dir,
                                      image_size=data_config.image_size, num_channels=data_config.num_channels,
                                      weights_sha256=weights_sha256)
  path = reference_path(config, provenance)
  cached = read_stats(path)
  differing = [key for key, value in provenance.items() if cached is not None and cached.get(key) != value]
  if on_every_process(cached is not None and not differing):
    reporting.console(f'reference statistics of {data_config.dataset!r} {split!r}: {path}')
    return cached
  why = f'its {", ".join(differing)} differ' if differing else 'not cached yet'
  reporting.console(f'computing the Inception statistics of {data_config.dataset!r} {split!r} ({why}): {path}')
  batches = (images for images, _ in fid.dataset_batches(
      data_config.dataset, split, data_dir=data_config.data_dir, batch_size=config.eval.batch_size,
      image_size=data_config.image_size, num_channels=data_config.num_channels))
  result = fid.stats_of(batches, inception_variables, mesh=mesh, batch_size=config.eval.batch_size,
                        with_inception_score=False, **provenance)
  if jax.process_index() == 0:
    image_files.save_npz(path, result)
  return result


def reference_path(config, provenance: dict) -> str:
  """<eval.cache_dir>/reference_<dataset>_<split>_<H>x<W>x<C>_n<count>_<hash of the provenance>.npz."""
  key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
  size, channels = provenance['image_size'], provenance['num_channels']
  name = (f'reference_{provenance["dataset"].replace("/", "_")}_{provenance["split"]}_{size}x{size}x{channels}_'
          f'n{provenance["count"]}_{key}.npz')
  return os.path.join(os.path.expanduser(config.eval.cache_dir or fid.CACHE_DIR), name)


def read_stats(path: str) -> dict | None:
  """The stats file at `path`, or None when there is none or it cannot be read (it is then recomputed)."""
  try:
    return fid.load_stats(path) if os.path.exists(path) else None
  except image_files.FileFormatError:
    return None


# -- Samples. --------------------------------------------------------------------------------------------------

def draw_samples(config, workdir: str, generate_fn, params, rng, *, mesh, step: int):
  """(uint8 images [N, H, W, C], labels [N]) for N = eval.num_samples, chunk by chunk (see the module doc): a
  chunk saved by an earlier run with the same settings is read back, a missing one drawn and saved."""
  num_samples, batch_size = config.eval.num_samples, config.sample.batch_size
  chunk = -(-CHUNK_SAMPLES // batch_size) * batch_size
  directory = chunk_dir(config, workdir, step=step, chunk=chunk)
  images, labels = [], []
  for index, start in enumerate(range(0, num_samples, chunk)):
    size = min(chunk, num_samples - start)
    path = os.path.join(directory, f'chunk{index:05d}_{size}.npz')
    saved = read_chunk(path, size)
    if not on_every_process(saved is not None):
      saved = generate.generate_images(
          generate_fn, params, jax.random.fold_in(rng, index), mesh=mesh, num_samples=size, batch_size=batch_size,
          num_classes=config.data.num_classes, class_label=config.sample.class_label)
      if jax.process_index() == 0:
        image_files.save_npz(path, {'arr_0': saved[0], 'arr_1': saved[1]})
      reporting.console(f'eval samples {start + size}/{num_samples} drawn (chunks in {directory})')
    images.append(saved[0])
    labels.append(saved[1])
  return np.concatenate(images), np.concatenate(labels)


def chunk_dir(config, workdir: str, *, step: int, chunk: int) -> str:
  """<workdir>/samples/eval_chunks_step<step>_<key>, `key` a hash of everything the samples depend on besides
  the checkpoint: the chunk size, seed, sampler, diffusion, model and image settings, the precision."""
  key = settings_key({**sample_settings(config), 'chunk': chunk})
  return os.path.join(workdir, 'samples', f'eval_chunks_step{step}_{key}')


def sample_settings(config) -> dict:
  """Every setting drawn samples depend on besides the checkpoint and their count: the seed, sampler, diffusion,
  model and image settings, the precision (not train, eval or sweep, nor --mode sample's count)."""
  settings = config.to_dict()
  for section in ('train', 'eval', 'sweep'):
    settings.pop(section, None)
  settings['data'] = {key: config.data[key] for key in ('image_size', 'num_channels', 'num_classes')}
  settings['parallel'] = {'precision': config.parallel.precision}
  for key in ('num_samples', 'checkpoint_step'):  # --mode sample's count; the step is in the name
    settings['sample'].pop(key)
  return settings


def settings_key(settings: dict) -> str:
  """A 16-hex-digit hash of `settings` (JSON, keys sorted)."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_chunk(path: str, size: int):
  """(images, labels) of the chunk saved at `path`, or None when it is missing, unreadable or not `size` long."""
  try:
    with np.load(path) as saved:
      images, labels = saved['arr_0'], saved['arr_1']
  except (OSError, ValueError, KeyError):
    return None
  return (images, labels) if len(images) == len(labels) == size else None


# -- NLL. ------------------------------------------------------------------------------------------------------

def bits_per_dim(config, nll_fn, params, *, mesh, rng) -> float:
  """Mean of the method's −log p(x0) bound in bits/dim (Method.nll_fn) over the first `eval.bpd_examples`
  examples of the test split (validation when there is none). Images are quantised to uint8 as the discretised
  decoder assumes. Batches of nll_batch_size (the last one padded)."""
  data_config, examples = config.data, config.eval.bpd_examples
  split = 'test' if 'test' in dataset_splits(config) else 'validation'
  bpd_fn = jax.jit(nll_fn, out_shardings=NamedSharding(mesh, PartitionSpec(parallel.AXIS)))

  batch_size = nll_batch_size(examples, max_batch=data_config.batch_size, devices=mesh.size)
  params = parallel.global_replicated(mesh, params)
  values = []
  batches = fid.dataset_batches(data_config.dataset, f'{split}[:{examples}]', data_dir=data_config.data_dir,
                                batch_size=batch_size, image_size=data_config.image_size,
                                num_channels=data_config.num_channels)
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


def nll_batch_size(examples: int, *, max_batch: int, devices: int) -> int:
  """The NLL's batch: `examples` in as few batches of at most `max_batch` (data.batch_size) as can be, evened
  out and rounded up to a multiple of `devices` (not data.batch_size itself, mostly padding for a few examples)."""
  num_batches = -(-examples // max_batch)
  per_batch = -(-examples // num_batches)
  return -(-per_batch // devices) * devices
