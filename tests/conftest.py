"""Session set-up: one persistent XLA compilation cache shared by every run of the test session, in this process,
its xdist workers and the CLI subprocesses (which inherit the environment). Compilation dominates a CPU test run,
and the tiny config's train step and sampler are the same programs in most runs.

And XLA's backend (LLVM) optimisations off for every program of the session: a test runs a program a few times,
so compiling it fast matters more than running it fast (a DDGAN train step: ~8 s to compile instead of ~50 s).
The subprocesses keep these flags (tests.tiny.xla_flags adds their device count to them).

And the longest files first: xdist hands out whole files (pyproject: --dist loadfile --no-loadscope-reorder) in
collection order, and a long file handed out last keeps one worker busy while the other idles."""
import os
import tempfile

from ddjax import xla_flags

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # set by the xdist controller, its workers inherit it
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ddjax-xla-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
xla_flags.apply()  # as the entry points do: the tests run what users run

# Test files by their time in a suite run, longest first; the others follow in their own order.
LONGEST_FIRST = ('test_parallel.py', 'test_ddgan.py', 'test_train.py', 'test_reliability.py', 'test_config.py',
                 'test_pretrained.py', 'test_unet.py', 'test_evaluate.py', 'test_sweep.py', 'test_adm.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)
