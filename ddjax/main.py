"""Entry point: python -m ddjax.main --config configs/<name>.py --workdir <dir> [--mode train|sample|eval|sweep|import]
(see the --mode flag)."""
import importlib
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddjax import xla_flags
from ddjax.validation import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections); override keys with --config.<key>=v.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints/, metrics.jsonl, samples/.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'sweep', 'import'],
                  'train (resumes automatically), sample, eval (FID/IS/bits per dim), sweep (a grid of sampler '
                  'settings, each scored), or import (a published checkpoint, --config.weights, as a workdir at '
                  'step 0).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0 (or DDJAX_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes (or DDJAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0..num_processes-1 (or DDJAX_PROCESS_ID).')
flags.DEFINE_integer('coordinator_timeout', 300, 'Multi-host: seconds to wait for all processes to connect.')
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_CONFIG_ERROR = 2  # an invalid setting or flag, or a weights file that does not fit: nothing was written
# no data, a missing or corrupt checkpoint or Inception weights file, a busy or unwritable workdir, a failed save, NaN
EXIT_FAILED = 1
EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143, the status of a process killed by SIGTERM; its checkpoint is saved


def parse_flags(argv):
  """absl's flag parsing, except that a bad --config value, key or file is one line and exit status 2."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises only when first read
    return argv
  except (flags.Error, AttributeError, KeyError, OSError) as error:
    # ml_collections raises AttributeError(KeyError(message)) for an unknown key, OSError for a bad file.
    unknown_key = isinstance(error, (AttributeError, KeyError))
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]
    message = ' '.join(str(error.args[0] if error.args else error).split())
    kind = 'flags' if isinstance(error, flags.Error) and not message.startswith('flag --config') else 'config'
    exit_with(f'invalid {kind}: {"unknown key " if unknown_key else ""}{message}', EXIT_CONFIG_ERROR)


def main(argv):
  del argv
  run_checked(FLAGS.mode, run_mode)


# --mode -> (module of ddjax, its function(config, workdir)); a module is imported only for its own mode.
MODES = {'train': ('train', 'train_and_evaluate'), 'sample': ('generate', 'sample_and_save'),
         'eval': ('evaluation.evaluate', 'evaluate'), 'sweep': ('evaluation.sweep', 'sweep'),
         'import': ('pretrained', 'import_to_workdir')}


def run_mode():
  module, function = MODES[FLAGS.mode]
  getattr(importlib.import_module(f'ddjax.{module}'), function)(FLAGS.config, FLAGS.workdir)


def run_checked(mode: str, task):
  """FLAGS.config validated for `mode` and its dataset checked, then task(); every expected failure is one line
  and its exit status (ddjax.study runs its own task through this too)."""
  xla_flags.apply()  # before JAX starts its backend
  logging.set_verbosity(logging.WARNING)  # orbax and clu log every save at INFO; our console lines suffice
  # Heavy imports after flag parsing, so --help is instant; TensorFlow (imported by train and sample) only once
  # the config is valid, so an invalid setting prints its one line and nothing else.
  from ddjax import config as config_lib, distributed
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           timeout_s=FLAGS.coordinator_timeout)
    config_lib.validate(FLAGS.config, mode=mode)
  except ConfigError as error:
    exit_with(f'invalid config: {error}', EXIT_CONFIG_ERROR)
  from ddjax import data, train
  from ddjax.checkpoint import CheckpointError
  from ddjax.evaluation.fid import InceptionWeightsError
  from ddjax.image_files import FileFormatError
  from ddjax.pretrained import PretrainedError
  from ddjax.workdir import WorkdirError
  try:
    data.check_prepared(FLAGS.config, mode)  # a missing dataset: one line before anything is built or written
    task()
  except ConfigError as error:
    exit_with(f'invalid config: {error}', EXIT_CONFIG_ERROR)
  except PretrainedError as error:
    exit_with(str(error), EXIT_CONFIG_ERROR)
  except train.Preempted as stop:
    exit_with(str(stop), EXIT_PREEMPTED)
  except (data.DatasetNotFoundError, CheckpointError, WorkdirError, FloatingPointError, InceptionWeightsError,
          FileFormatError) as error:
    exit_with(str(error), EXIT_FAILED)


def exit_with(message: str, status: int):
  print(f'ddjax: {message}', file=sys.stderr)
  sys.exit(status)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
