"""Entry point: python -m ddjax.main --config configs/<name>.py --workdir <dir> [--mode train|sample]."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddjax.validation import ConfigError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections); override keys with --config.<key>=v.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints/, metrics.jsonl, samples/.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'train (resumes automatically) or sample.')
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_CONFIG_ERROR = 2  # an invalid setting: nothing was built or compiled


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and clu log every save at INFO; our console lines suffice
  # Heavy imports after flag parsing, so --help is instant.
  from ddjax import sample, train
  from ddjax.checkpoint import CheckpointNotFoundError
  from ddjax.data import DatasetNotFoundError
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      sample.sample_and_save(FLAGS.config, FLAGS.workdir)
  except ConfigError as error:
    print(f'ddjax: invalid config: {error}', file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)
  except (DatasetNotFoundError, CheckpointNotFoundError) as error:
    print(f'ddjax: {error}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
