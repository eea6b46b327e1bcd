"""Reliability under faults, through the real CLI: exact resume after SIGKILL, preemption (SIGTERM), torn and
corrupt checkpoints, a non-finite loss, a full disk, a busy or unwritable workdir, missing data.

Every run that survives a fault must end bitwise identical to one straight 40-step run (`straight`): same
parameters, EMA, optimizer state, RNG, and the same loss at every step (the same data order). Faults are injected
by tests/faults.py. A run whose process a fault kills, or that must run beside another, is a process of its own
(sharing the session's persistent XLA compilation cache, tests/conftest.py); the others run the CLI in this
process (tests.tiny.run_main_in_process), where they share one compiled train step.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddjax import checkpoint
from tests import faults
from tests.tiny import REPO, TINY, logged, restore_state, run_main_in_process, tiny_config, xla_flags

STEPS = 40
RUN = {'train.num_steps': STEPS, 'train.log_every': 1, 'train.checkpoint_every': 10, 'train.sample_every': 0,
       'train.keep_checkpoints': 3}
TMP = '.orbax-checkpoint-tmp'


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
  """cli(workdir, *args, fault=(name, step), process=False, popen=False, **overrides): the tiny config through the
  real CLI, in this process (tests.tiny.run_main_in_process), or in a process of its own when the fault kills it
  (process=True) or it runs beside this one (popen=True: the Popen)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))

  def run(workdir, *args, fault=(), process=False, popen=False, **overrides):
    flags = [f'--config.{k}={v}' for k, v in {**TINY, **RUN, 'data.data_dir': data_dir, **overrides}.items()]
    arguments = ['--config', 'configs/digits.py', '--workdir', str(workdir), *flags, *args]
    if not (process or popen):
      with pytest.MonkeyPatch.context() as patches:
        if fault:
          faults.inject(*fault, patch=patches.setattr)
        return run_main_in_process(arguments)
    program = ['-m', 'tests.faults', *map(str, fault)] if fault else ['-m', 'ddjax.main']
    command = [sys.executable, *program, *arguments]
    if popen:
      return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return run


@pytest.fixture(scope='module')
def straight(cli, tmp_path_factory):
  """The reference: 40 steps without a fault (checkpoints 20, 30, 40)."""
  workdir = tmp_path_factory.mktemp('straight')
  result = cli(workdir)
  assert result.returncode == 0, result.stderr
  return workdir


def messages(result) -> list:
  """ddjax's own stderr lines (TensorFlow and orbax log around them)."""
  return [line for line in result.stderr.splitlines() if line.startswith('ddjax:')]


def checkpoint_dirs(workdir) -> list:
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=lambda name: int(name.split('.')[0]))


def assert_same_state(workdir, reference, step=STEPS):
  """Step, params, EMA params, optimizer state and RNG of checkpoint `step`, bitwise."""
  config = tiny_config(None, **RUN)
  got, want = restore_state(workdir, config, step), restore_state(reference, config, step)
  for field in ('step', 'params', 'ema_params', 'opt_state', 'rng'):
    for a, b in zip(jax.tree.leaves(getattr(got, field)), jax.tree.leaves(getattr(want, field)), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)


def assert_same_metrics(workdir, reference):
  """Every record in metrics.jsonl (a step replayed after a crash appears twice) equals the reference's step."""
  want = {key: logged(reference, key) for key in ('loss', 'grad_norm', 'param_norm', 'loss_q0', 'loss_q3')}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert sorted({r['step'] for r in records}) == list(range(1, STEPS + 1))
  for record in records:
    for key, values in want.items():
      assert record[key] == values[record['step']], (key, record['step'])


def copy_of(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  return tmp_path


# ----------------------------------------------------------------------------------------------------------------
# Crashes: SIGKILL after a checkpoint and during a save; then exact resume
# ----------------------------------------------------------------------------------------------------------------

def test_sigkill_after_checkpoint_and_during_save_resume_bitwise_identical(cli, straight, tmp_path):
  # SIGKILL at step 25, training going on past checkpoint 20: the steps after 20 are lost, nothing else.
  killed = cli(tmp_path, fault=('kill_at_step', 25), process=True)
  assert killed.returncode == -signal.SIGKILL
  assert checkpoint_dirs(tmp_path) == ['10', '20'] and max(logged(tmp_path)) > 20
  # Resumed (the dead run's lock died with it), then SIGKILLed while checkpoint 30 is committed: a torn save.
  torn = cli(tmp_path, fault=('kill_in_save', 30), process=True)
  assert torn.returncode == -signal.SIGKILL
  assert f'resumed from {tmp_path}/checkpoints at step 20' in torn.stdout
  assert checkpoint_dirs(tmp_path) == ['10', '20', '30' + TMP]
  # The next start ignores the torn save, with a warning, resumes from 20 and ends where the straight run ended.
  resumed = cli(tmp_path)
  assert resumed.returncode == 0, resumed.stderr
  assert f'ignoring {tmp_path}/checkpoints/30{TMP}: a save that was interrupted' in resumed.stdout
  assert f'resumed from {tmp_path}/checkpoints at step 20' in resumed.stdout
  assert checkpoint_dirs(tmp_path) == ['20', '30', '40']
  assert_same_state(tmp_path, straight)
  assert_same_metrics(tmp_path, straight)


# ----------------------------------------------------------------------------------------------------------------
# Preemption (SIGTERM) and a second run in the same workdir
# ----------------------------------------------------------------------------------------------------------------

def test_sigterm_saves_and_resumes_and_a_second_run_is_refused(cli, tmp_path):
  first = cli(tmp_path, popen=True, **{'train.num_steps': 100_000, 'train.log_every': 10})
  try:
    deadline = time.time() + 240
    while not os.path.isdir(tmp_path / 'checkpoints' / '10') and first.poll() is None and time.time() < deadline:
      time.sleep(0.05)  # polls for a condition; nothing depends on timing
    assert first.poll() is None, first.communicate()[1]
    second = cli(tmp_path)
    assert second.returncode == 1
    assert messages(second) == [f'ddjax: workdir {tmp_path} is in use by another training run (pid {first.pid} on '
                                f'{os.uname().nodename}); wait for it to end or use another --workdir']
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 143
  [message] = [line for line in stderr.splitlines() if line.startswith('ddjax:')]
  step = int(checkpoint_dirs(tmp_path)[-1])
  assert step >= 10
  assert message == (f'ddjax: preempted (SIGTERM) at step {step}: saved checkpoint {step} in {tmp_path}/checkpoints; '
                     'run the same command again to resume')
  resumed = cli(tmp_path, **{'train.num_steps': step + 1})
  assert resumed.returncode == 0, resumed.stderr
  assert f'resumed from {tmp_path}/checkpoints at step {step}' in resumed.stdout
  assert int(checkpoint_dirs(tmp_path)[-1]) == step + 1


# ----------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints, a non-finite loss, a full disk
# ----------------------------------------------------------------------------------------------------------------

def files_under(directory):
  return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]


def test_corrupt_newest_checkpoints_sample_refuses_train_resumes_from_newest_intact(cli, straight, tmp_path):
  workdir = copy_of(straight, tmp_path)
  # 40: 8 bytes flipped inside the array data; orbax restores that without complaint, only the CRC notices.
  largest = max(files_under(workdir / 'checkpoints' / '40'), key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.seek(os.path.getsize(largest) // 2)
    garbled = bytes(b ^ 0xFF for b in f.read(8))
    f.seek(os.path.getsize(largest) // 2)
    f.write(garbled)
  # 30: every data file truncated to half.
  for path in files_under(workdir / 'checkpoints' / '30'):
    if os.sep + 'd' + os.sep in path:
      os.truncate(path, os.path.getsize(path) // 2)

  sampled = cli(workdir, '--mode', 'sample')
  assert sampled.returncode == 1
  assert messages(sampled) == [f'ddjax: checkpoint 40 in {workdir}/checkpoints is corrupt: its data does not match '
                               'the CRC32 recorded when it was saved; other steps: [20, 30] (pick one with '
                               '--config.sample.checkpoint_step)']
  assert checkpoint_dirs(workdir) == ['20', '30', '40']  # sampling moves nothing

  resumed = cli(workdir)
  assert resumed.returncode == 0, resumed.stderr
  warnings = [line for line in resumed.stdout.splitlines() if line.startswith('warning:')]
  assert len(warnings) == 2
  assert 'checkpoint 40' in warnings[0] and 'does not match the CRC32' in warnings[0]
  assert 'checkpoint 30' in warnings[1] and 'cannot be restored' in warnings[1]
  assert f'resumed from {workdir}/checkpoints at step 20' in resumed.stdout
  assert checkpoint_dirs(workdir) == ['20', '30', '40']
  assert sorted(name.split('.')[0] for name in os.listdir(workdir / 'checkpoints.corrupt')) == ['30', '40']
  assert_same_state(workdir, straight)


def test_non_finite_loss_stops_before_saving_and_keeps_last_good_checkpoint(cli, straight, tmp_path):
  workdir = copy_of(straight, tmp_path)
  # A NaN batch at step 43; no log before step 60, so only the check before the save at 50 can catch it.
  result = cli(workdir, fault=('nan_batch', 43), **{'train.num_steps': 60, 'train.log_every': 100})
  assert result.returncode == 1
  [message] = messages(result)
  assert message.startswith('ddjax: non-finite loss (nan) at step 43; stopped without saving: the last good '
                            f'checkpoint (step 40) is kept in {workdir}/checkpoints'), message
  assert checkpoint_dirs(workdir) == ['20', '30', '40']
  assert_same_state(workdir, straight)


def test_disk_full_on_save_fails_clearly_and_loses_nothing(cli, straight, tmp_path):
  workdir = copy_of(straight, tmp_path)
  result = cli(workdir, fault=('disk_full', 50), **{'train.num_steps': 60})
  assert result.returncode == 1
  assert messages(result) == [f'ddjax: writing a checkpoint to {workdir}/checkpoints failed ([Errno 28] No space '
                              'left on device); the checkpoints saved before it are untouched']
  # Orbax deletes the oldest step only after a newer save completes: 20 is still there.
  assert checkpoint_dirs(workdir) == ['20', '30', '40', '50' + TMP]
  assert_same_state(workdir, straight)
  config = tiny_config(None, **RUN)
  manager = checkpoint.create_manager(workdir, read_only=True)
  warnings = []
  state = checkpoint.resume(manager, restore_state(straight, config), warn=warnings.append)
  assert int(state.step) == 40 and warnings == [f'warning: ignoring {workdir}/checkpoints/50{TMP}: a save that was '
                                                'interrupted']


# ----------------------------------------------------------------------------------------------------------------
# Bad surroundings: an unwritable workdir, missing data (both fail before anything compiles)
# ----------------------------------------------------------------------------------------------------------------

def test_unwritable_workdir_fails_clearly(cli, tmp_path):
  (tmp_path / 'file').write_text('')
  result = cli(tmp_path / 'file' / 'workdir')
  assert result.returncode == 1
  assert messages(result) == [f'ddjax: cannot write to workdir {tmp_path}/file/workdir: Not a directory']


@pytest.mark.parametrize('mode', ['train', 'eval', 'sample'])
def test_missing_dataset_fails_clearly(cli, tmp_path, mode):
  """train and eval check the dataset first: one line, exit 1, nothing written (no lock, checkpoints/ or
  metrics.jsonl). sample reads no data: it gets as far as the missing checkpoint, and writes nothing either."""
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('kept')
  result = cli(workdir, '--mode', mode, **{'data.dataset': 'mnist', 'data.data_dir': tmp_path / 'no_tfds'})
  assert result.returncode == 1, result.stderr
  [message] = messages(result)
  assert message == result.stderr.strip().splitlines()[-1] and 'Traceback' not in result.stderr, result.stderr
  if mode == 'sample':
    assert message == f'ddjax: no checkpoint in {workdir}/checkpoints; train first (--mode train)', message
  else:
    assert message == (f"ddjax: dataset 'mnist' is not prepared in {tmp_path}/no_tfds: prepare it with "
                       f'`tfds build mnist --data_dir {tmp_path}/no_tfds` '
                       '(see https://www.tensorflow.org/datasets/catalog/mnist)'), message
  assert os.listdir(workdir) == ['notes.txt'] and not (tmp_path / 'no_tfds').exists()
