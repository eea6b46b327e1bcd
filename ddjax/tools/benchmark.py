"""Throughput of the real compiled programs: the train step over every device, the sampler, the FID network.

  python -m ddjax.benchmark --config configs/<cfg>.py --what train|sample|fid [--config.<key>=<value> ...]

Progress goes to stderr; the last stdout line is one JSON object: `what`, `images_per_sec`, `ms_per_step` (the
median of `--steps` timed steps after `--warmup` untimed ones, each ended with block_until_ready), `compile_s`
(the first call less a timed step: trace + compile), `param_count`, `peak_host_memory_bytes` (maxrss),
`peak_device_memory_bytes` and `device_memory_limit_bytes` (what the allocator may hold on a device; both
null where the backend keeps no statistics, as XLA:CPU), `device_kind`, `device_count`, `batch_size` (global),
and

- train: `flops_per_step` (XLA's cost analysis of one device's step before optimisation; see flops_of) and
  `data_wait_fraction` (time in next(batches) / step time, over the real input pipeline; `--data=mock` runs
  that pipeline on random images of the dataset's real shapes and dtypes (tfds.testing.mock_data: decode,
  shuffle, batch, prefetch as for real data) where the dataset is not prepared, `--data=synthetic` bypasses
  it with batches of the same shapes);
- sample: `ms_per_network_eval` (one jitted forward of the sampled network at the same batch, its calls
  alternating with the sampler's) and `overhead_ratio` = sampler time / (N × that), N the network evaluations
  of one sample;
- fid: the FID Inception network (random weights) on uint8 images of the config's size at eval.batch_size;
- with `--profile=N`: `profile`, where the time of N more calls went, by a jax.profiler trace (ddjax.tools.profiling;
  the trace is kept in `--profile_dir` if given; null if the profiler failed), also printed on stderr.

A timed step that compiles is an error: the figures would time XLA, not the program.
"""
import contextlib
import dataclasses
import functools
import itertools
import json
import resource
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ddjax import config as config_lib, generate, methods, parallel, xla_flags
from ddjax.evaluation import fid, inception
from ddjax.methods.base import count_params
from ddjax.tools import profiling
from ddjax.validation import ConfigError

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags; defined only when run as a program (ddjax.main owns --config in-process)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections); override keys with '
                                  '--config.<key>=v.', lock_config=True)
  flags.DEFINE_enum('what', 'train', ['train', 'sample', 'fid'], 'The program to time.')
  flags.DEFINE_integer('steps', 10, 'Timed steps (>= 10 for the reported median).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after the first (compiling) one.')
  flags.DEFINE_enum('data', 'real', ['real', 'mock', 'synthetic'],
                    'train input: the real pipeline (ddjax.data); the same pipeline on random images of the '
                    'dataset\'s shapes (mock: an unprepared dataset such as cifar10 on a machine without it); or '
                    'random batches that bypass it (synthetic).')
  flags.DEFINE_integer('profile', 0, 'Calls to trace with jax.profiler after the timed ones (0: none), and '
                       'report where their time went.')
  flags.DEFINE_string('profile_dir', None, 'Keep the --profile trace here (TensorBoard / XProf / Perfetto).')
  flags.mark_flags_as_required(['config'])


MOCK_EXAMPLES = 4096  # per split: enough that an epoch is many steps, as a real dataset's is


def mock_dataset():
  """tfds.testing.mock_data with random examples of each dataset's features."""
  import tensorflow_datasets as tfds  # TFDS and TensorFlow only for real or mock input (see train)
  return tfds.testing.mock_data(num_examples=MOCK_EXAMPLES)


def log(message: str) -> None:
  print(f'[benchmark] {message}', file=sys.stderr, flush=True)


BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # jax.monitoring's event per XLA compilation
_compiled = []  # one entry per compilation, once the listener is registered


def compilations() -> int:
  """XLA compilations (jit, pmap and shard_map alike) in this process since the first call, counted from
  jax.monitoring's events (its listener is registered by that call, not on import)."""
  if not _compiled:
    _compiled.append('listening')
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: _compiled.append(event) if event == BACKEND_COMPILE_EVENT else None)
  return len(_compiled) - 1


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timings:
  first_s: float             # the first call: trace, compile, run
  step_s: tuple[float, ...]  # each timed step, input wait included
  wait_s: tuple[float, ...]  # of which waiting for the input

  @property
  def median_s(self) -> float:
    return statistics.median(self.step_s)

  @property
  def compile_s(self) -> float:
    return max(self.first_s - self.median_s, 0.0)

  @property
  def wait_fraction(self) -> float:
    return sum(self.wait_s) / sum(self.step_s)


def time_steps(next_input, run, *, warmup: int, steps: int) -> Timings:
  """Calls run(next_input()) 1 + warmup + steps times, each blocked until its outputs are ready; times the last
  `steps`. RuntimeError if any call after the first compiles."""
  return time_alternating([(next_input, run)], warmup=warmup, steps=steps)[0]


def time_alternating(programs, *, warmup: int, steps: int) -> list[Timings]:
  """time_steps of each (next_input, run) of `programs`, their calls alternating (one of each per step), so that
  figures set against each other come from the same minutes of a machine whose speed drifts (a small CPU's does,
  by tens of percent between rounds of one process)."""

  def one_step(next_input, run):
    start = time.perf_counter()
    inputs = next_input()
    waited = time.perf_counter() - start
    jax.block_until_ready(run(inputs))
    return time.perf_counter() - start, waited

  first_s = [one_step(*program)[0] for program in programs]
  compiled = compilations()
  for _ in range(warmup):
    for program in programs:
      one_step(*program)
  timed = [[one_step(*program) for program in programs] for _ in range(steps)]
  if compilations() != compiled:
    raise RuntimeError(f'{compilations() - compiled} compilation(s) after the first step: the step recompiles')
  return [Timings(first, *zip(*(step[i] for step in timed))) for i, first in enumerate(first_s)]


@dataclasses.dataclass(frozen=True)
class Profile:
  calls: int = 0          # traced calls after the timed ones; 0: no profile
  log_dir: str | None = None

  def fields(self, jitted, args, call) -> dict:
    """{'profile': where the time of `calls` calls of call() went} ({} if no calls), printed on stderr too;
    `jitted` on `args` is the program call() runs, looked up again in JAX's cache for its compiled text."""
    if not self.calls:
      return {}
    compiled = compilations()
    text = jitted.lower(*args).compile().as_text()
    if compilations() != compiled:
      log('the profiled program was compiled a second time to read its text')
    try:
      result = profiling.profile(call, text, calls=self.calls, log_dir=self.log_dir)
    except Exception:  # a profiler that cannot start here (no CUPTI, ...) costs the profile, not the figures
      logging.exception('profile failed')
      return {'profile': None}
    log(f'where the time of {self.calls} traced calls went:\n' + profiling.format_breakdown(result))
    return {'profile': result}


def common_fields(what: str, timings: Timings, *, batch_size: int, param_count: int) -> dict:
  devices = jax.local_devices()
  stats = [device.memory_stats() or {} for device in devices]
  peaks, limits = [d.get('peak_bytes_in_use') for d in stats], [d.get('bytes_limit') for d in stats]
  return {
      'what': what,
      'images_per_sec': batch_size / timings.median_s,
      'ms_per_step': 1e3 * timings.median_s,
      'compile_s': timings.compile_s,
      'param_count': param_count,
      'peak_host_memory_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
      'peak_device_memory_bytes': None if None in peaks else max(peaks),
      'device_memory_limit_bytes': None if None in limits else min(limits),
      'device_kind': devices[0].device_kind,
      'device_count': jax.device_count(),
      'batch_size': batch_size,
  }


# ----------------------------------------------------------------------------------------------------------------
# train: the method's step over every device, as train.py runs it
# ----------------------------------------------------------------------------------------------------------------

def abstract_batch(config, examples: int) -> dict:
  """A train batch of `examples` examples as ShapeDtypeStructs, in the input pipeline's format."""
  size, channels = config.data.image_size, config.data.num_channels
  return {'image': jax.ShapeDtypeStruct((examples, size, size, channels), np.float32),
          'label': jax.ShapeDtypeStruct((examples,), np.int32)}


def synthetic_batches(config):
  """Random batches of this host's share of the global batch, in the pipeline's format, forever: two drawn once
  and repeated, as drawing runs between the timed steps (512×64×64×3: tens of ms, more than a fast GPU step)."""
  rng, spec = np.random.default_rng(0), abstract_batch(config, config.data.batch_size // jax.process_count())
  draw = lambda: {'image': rng.uniform(-1, 1, spec['image'].shape).astype(spec['image'].dtype),
                  'label': rng.integers(0, max(config.data.num_classes, 1), spec['label'].shape).astype(
                      spec['label'].dtype)}
  return itertools.cycle([draw() for _ in range(2)])


def flops_of(fn, *args) -> float | None:
  """FLOPs of one call of `fn` on `args` (ShapeDtypeStructs) by XLA's cost analysis of its HLO before
  optimisation (a loop body counted once), lowered for the CPU whatever the default backend: the count is the
  program's, not the machine's, and on a GPU neither other route gives it. The compiled program's analysis counts
  the convolutions that XLA:GPU hands to cuDNN as nothing (an H200 compile of the ImageNet-64 res-res train step
  counted 0.29 of its 15.7 TFLOP), and jax has no analysis of a lowered program for a PJRT plugin's backend
  (CUDA's). None where JAX runs without its CPU backend (JAX_PLATFORMS naming only others)."""
  try:
    cpu = jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return None
  with jax.default_device(cpu):  # unsharded inputs lower for the default device's backend
    analysis = jax.jit(fn).lower(*args).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return analysis.get('flops') if analysis else None


def train(config, *, warmup: int, steps: int, synthetic: bool, profile: Profile = Profile()) -> dict:
  method = methods.build(config)
  mapper = parallel.DataParallel.create(config.parallel.mode)
  log('initial state')
  state = method.initial_state()
  param_count = count_params(state.params)
  if synthetic:
    source = synthetic_batches(config)
  else:  # TensorFlow only when a dataset is read: the synthetic, sample and fid runs need JAX alone (GPU images)
    from ddjax import data
    source = data.create_dataset(config)
  batches = parallel.prefetch(source, mapper.shard_batch)
  step_fn = mapper.map(method.train_step)
  holder = {'state': mapper.replicate(state)}
  del state  # the step donates its state: keep only the newest

  def run(batch):
    holder['state'], metrics = step_fn(holder['state'], batch)
    return metrics

  log(f'train: 1 + {warmup} + {steps} steps of global batch {config.data.batch_size}')
  timings = time_steps(lambda: next(batches), run, warmup=warmup, steps=steps)
  return {**common_fields('train', timings, batch_size=config.data.batch_size, param_count=param_count),
          'flops_per_step': flops_of(functools.partial(method.train_step, axis_name=None), method.abstract_state(),
                                     abstract_batch(config, config.data.batch_size // jax.device_count())),
          'data_wait_fraction': timings.wait_fraction,
          **profile.fields(step_fn, (holder['state'], next(batches)), lambda: run(next(batches)))}


# ----------------------------------------------------------------------------------------------------------------
# sample: the method's sampler, and one bare network evaluation at the same batch
# ----------------------------------------------------------------------------------------------------------------

def sample(config, *, warmup: int, steps: int, profile: Profile = Profile()) -> dict:
  method = methods.build(config)
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  log('initial state')
  params = parallel.global_replicated(mesh, method.initial_state().ema_params)
  batch = generate.padded_batch_size(config.sample.batch_size, mesh.size)
  indices = parallel.global_sharded(mesh, np.arange(batch, dtype=np.int32))
  labels = parallel.global_sharded(mesh, np.arange(batch, dtype=np.int32) % max(config.data.num_classes, 1))
  generate_fn = generate.make_generate_fn(method.sample_fn, mesh)
  rng = jax.random.key(0)
  arguments = (params, rng, indices, labels)
  size, channels = config.data.image_size, config.data.num_channels
  x = parallel.global_sharded(mesh, np.random.default_rng(0).standard_normal((batch, size, size, channels),
                                                                              dtype=np.float32))
  conditional = bool(config.data.num_classes)
  forward = jax.jit(lambda p, x, y: method.network_fn(p, x, y if conditional else None, jax.random.key(1)))
  log(f'sample ({method.sampler}) and a bare forward, alternating: 1 + {warmup} + {steps} batches of {batch}')
  sampler, one_eval = time_alternating([(lambda: arguments, lambda a: generate_fn(*a)),
                                        (lambda: (params, x, labels), lambda a: forward(*a))],
                                       warmup=warmup, steps=steps)
  return {**common_fields('sample', sampler, batch_size=batch, param_count=count_params(params)),
          'ms_per_network_eval': 1e3 * one_eval.median_s,
          'overhead_ratio': sampler.median_s / (method.network_evals * one_eval.median_s),
          **profile.fields(generate_fn, arguments, lambda: generate_fn(*arguments))}


# ----------------------------------------------------------------------------------------------------------------
# fid: the FID Inception network's feature throughput
# ----------------------------------------------------------------------------------------------------------------

def fid_features(config, *, warmup: int, steps: int, profile: Profile = Profile()) -> dict:
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  batch = generate.padded_batch_size(config.eval.batch_size, mesh.size)
  size, channels = config.data.image_size, config.data.num_channels
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)
  log('random Inception weights')
  variables = jax.jit(inception.InceptionV3().init)(jax.random.key(0), images[:1])
  feature_fn = fid.make_feature_fn(mesh)
  variables = parallel.global_replicated(mesh, variables)
  placed = parallel.global_sharded(mesh, images)
  log(f'fid: 1 + {warmup} + {steps} batches of {batch} {size}x{size} images')
  timings = time_steps(lambda: placed, lambda x: feature_fn(variables, x), warmup=warmup, steps=steps)
  return {**common_fields('fid', timings, batch_size=batch, param_count=count_params(variables.get('params', {}))),
          **profile.fields(feature_fn, (variables, placed), lambda: feature_fn(variables, placed))}


def main(argv):
  del argv
  xla_flags.apply()  # before JAX starts its backend
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens at INFO
  config = FLAGS.config
  try:
    config_lib.validate(config)
  except ConfigError as error:
    print(f'invalid config: {error}', file=sys.stderr)
    sys.exit(2)
  if FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.profile < 0:
    print(f'invalid flags: --steps={FLAGS.steps} must be >= 1, --warmup={FLAGS.warmup} >= 0, '
          f'--profile={FLAGS.profile} >= 0', file=sys.stderr)
    sys.exit(2)
  options = dict(warmup=FLAGS.warmup, steps=FLAGS.steps, profile=Profile(FLAGS.profile, FLAGS.profile_dir))
  if FLAGS.what == 'train':
    with mock_dataset() if FLAGS.data == 'mock' else contextlib.nullcontext():
      result = train(config, synthetic=FLAGS.data == 'synthetic', **options)
  elif FLAGS.what == 'sample':
    result = sample(config, **options)
  else:
    result = fid_features(config, **options)
  print(json.dumps(result), flush=True)


def run():
  """`python -m ddjax.benchmark`."""
  define_flags()
  app.run(main)
