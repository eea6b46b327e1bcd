"""The tiny training config shared by the end-to-end tests, in-process and through the real CLI."""
import contextlib
import io
import json
import os
import subprocess
import sys
import unittest.mock

from configs import digits as digits_config, digits_ddgan as digits_ddgan_config
from ddjax import checkpoint, methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 8×8 digits, a 2-level U-Net, T=50, global batch 16 (divisible by 8 fake devices); seconds per run on a CPU.
TINY = {
    'data.batch_size': 16, 'model.ch': 16, 'model.num_levels': 2, 'model.blocks': 'res,clsAtn,chnAtn',
    'model.t_dim': 32, 'model.c_dim': 32, 'model.num_heads': 2, 'diffusion.num_timesteps': 50,
    'train.num_steps': 4, 'train.log_every': 2, 'train.checkpoint_every': 2, 'train.sample_every': 4,
    'train.warmup_steps': 2, 'sample.num_samples': 16, 'sample.batch_size': 16, 'sample.num_steps': 5,
}


# DDGAN on 8×8 digits: T=4, a 2-level NCSN++ of width 16, global batch 32 (4 per device on 8 fake devices, one
# minibatch-stddev group each), R1 every 2 steps so that both branches of the discriminator step run. Rates and R1
# weight fixed here (not the digits default's): the 8- vs 1-device tolerances of test_ddgan were measured with them.
TINY_DDGAN = {
    'data.batch_size': 32, 'model.ch': 16, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1, 'gan.nz': 8,
    'gan.z_emb_dim': 16, 'gan.n_mlp': 1, 'gan.d_ch': 8, 'gan.lazy_reg': 2, 'gan.r1_gamma': 0.05,
    'gan.lr_g': 5e-4, 'gan.lr_d': 4e-4,
    'train.num_steps': 4, 'train.log_every': 2, 'train.checkpoint_every': 2, 'train.sample_every': 4,
    'sample.num_samples': 16, 'sample.batch_size': 16,
}


def tiny_config(data_dir=None, **overrides):
  """The digits config with TINY and then `overrides` ({'section.key': value}) applied."""
  return _configured(digits_config.get_config(), data_dir, {**TINY, **overrides})


def tiny_ddgan_config(data_dir=None, **overrides):
  """The digits_ddgan config with TINY_DDGAN and then `overrides` applied."""
  return _configured(digits_ddgan_config.get_config(), data_dir, {**TINY_DDGAN, **overrides})


def _configured(config, data_dir, settings):
  config.data.data_dir = data_dir
  for key, value in settings.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def main_args(workdir, data_dir=None, *, ddgan=False, **overrides):
  """The ddjax.main arguments of the tiny config (TINY_DDGAN's if `ddgan`) with `overrides`."""
  config, tiny = ('configs/digits_ddgan.py', TINY_DDGAN) if ddgan else ('configs/digits.py', TINY)
  flags = [f'--config.{k}={v}' for k, v in {**tiny, **overrides}.items()]
  if data_dir:
    flags.append(f'--config.data.data_dir={data_dir}')
  return ['--config', config, '--workdir', str(workdir), *flags]


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with `devices` fake CPU devices: the session's flags (tests/conftest.py) and the
  device count."""
  return f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'.strip()


def run_main(workdir, data_dir=None, *, devices=1, extra_args=(), env=None, timeout=300, **overrides):
  """`python -m ddjax.main` on the tiny config with `devices` fake CPU devices; returns the CompletedProcess."""
  environment = dict(os.environ, XLA_FLAGS=xla_flags(devices), **(env or {}))
  return subprocess.run([sys.executable, '-m', 'ddjax.main', *main_args(workdir, data_dir, **overrides),
                         *extra_args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def run_main_in_process(args) -> subprocess.CompletedProcess:
  """`python -m ddjax.main *args` run in this process: the CLI's own flag parsing, error handling, exit status and
  output, without a new process's imports and compilations (ddjax.train keeps the last run's programs). For runs
  that need no process of their own, as a signal, a device count or a second workdir lock holder do."""
  from ddjax import main  # defines its absl flags: imported only by the tests that use it
  stdout, stderr, status = io.StringIO(), io.StringIO(), 0
  argv = ['ddjax.main', *map(str, args)]
  main.FLAGS.unparse_flags()  # every flag back to its default, as in a new process ...
  for name in [name for name in main.FLAGS if name.startswith('config.')]:
    delattr(main.FLAGS, name)  # ... and the last run's --config.<key> override flags gone
  with (contextlib.chdir(REPO), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr),
        unittest.mock.patch.object(sys, 'argv', argv)):  # the --config.<key> flags are defined from sys.argv
    try:
      main.main(main.parse_flags(argv))
    except SystemExit as exit:
      status = exit.code
  return subprocess.CompletedProcess(args, status, stdout.getvalue(), stderr.getvalue())


def run_processes(num_processes, devices, workdir, data_dir=None, *, ddgan=False, timeout=600, **overrides):
  """The tiny config (main_args) through launch/local_multiprocess.sh: `num_processes` jax.distributed processes on
  this machine with `devices` CPU devices each."""
  return subprocess.run(['bash', 'launch/local_multiprocess.sh', str(num_processes), str(devices),
                         *main_args(workdir, data_dir, ddgan=ddgan, **overrides)], cwd=REPO,
                        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                        timeout=timeout)


def logged(workdir, key='loss'):
  """{step: value} of `key` from <workdir>/metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {record['step']: record[key] for record in map(json.loads, f)}


def restore_state(workdir, config, step=None):
  """The TrainState saved in <workdir> at `step` (newest when None)."""
  template = methods.abstract_state(config)
  return checkpoint.restore(checkpoint.create_manager(workdir, read_only=True), template, step)
