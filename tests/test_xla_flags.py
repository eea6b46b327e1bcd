"""ddjax.xla_flags: nothing at import; the entry points' flags only for their platform, only on the jaxlib releases
that know them, never over the user's own value."""
import os
import subprocess
import sys

import jax
import pytest

from ddjax import xla_flags
from tests.tiny import REPO

CPU_FLAG, GPU_FLAG = 'xla_cpu_experimental_ynn_fusion_type', 'xla_gpu_enable_latency_hiding_scheduler'


def python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env={'PATH': os.environ.get('PATH', ''), **env},
                        capture_output=True, text=True, timeout=120)


def test_importing_ddjax_changes_no_environment_variable():
  result = python('import os; e = dict(os.environ); import ddjax; assert dict(os.environ) == e, "changed"',
                  XLA_FLAGS='--xla_force_host_platform_device_count=2')
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('platform, flag', [('cpu', CPU_FLAG), ('gpu', GPU_FLAG)])
def test_each_platform_gets_only_its_own_flags(platform, flag):
  release = xla_flags.FLAGS[flag][2][0]
  assert [f.split('=')[0] for f in xla_flags.flags_for(platform, release, '')] == [f'--{flag}']
  assert xla_flags.flags_for('tpu', release, '') == []


def test_the_users_value_wins_and_unknown_releases_get_nothing():
  first, end = xla_flags.FLAGS[CPU_FLAG][2]
  assert xla_flags.flags_for('cpu', first, f'--{CPU_FLAG}=reduce') == []
  assert xla_flags.flags_for('cpu', end, '') == []
  assert xla_flags.flags_for('cpu', (first[0], first[1] - 1), '') == []


@pytest.mark.parametrize('requested, platform', [('cpu', 'cpu'), ('cuda', 'gpu'), ('rocm,cpu', 'gpu'), ('tpu', 'tpu')])
def test_the_platform_is_read_from_jax_platforms(monkeypatch, requested, platform):
  monkeypatch.setenv('JAX_PLATFORMS', requested)
  assert xla_flags.target_platform() == platform


def test_the_installed_jaxlib_knows_the_flags_the_table_gives_it():
  """An XLA build aborts on an unknown flag in XLA_FLAGS; a compile option it does not know is an error instead,
  which tells whether the table's release ranges are right for the installed jaxlib."""
  release = xla_flags.jaxlib_release()
  for name, (_, _, (first, end)) in xla_flags.FLAGS.items():
    if not first <= release < end:
      continue
    with pytest.raises(Exception) as error:  # a value no flag accepts: only the option's name is checked here
      jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options={name: 'not-a-value'})
    assert 'No such compile option' not in str(error.value), name


def test_a_process_with_the_cpu_flags_applied_runs():
  result = python('from ddjax import xla_flags; xla_flags.apply("cpu"); import os, jax; '
                  'print(float(jax.jit(lambda x: x + 1)(1.0)), os.environ["XLA_FLAGS"])', XLA_FLAGS='')
  assert result.returncode == 0, result.stderr
  value, *flags = result.stdout.split()
  assert value == '2.0' and flags == xla_flags.flags_for('cpu', xla_flags.jaxlib_release(), '')
