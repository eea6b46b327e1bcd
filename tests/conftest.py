"""Session set-up: one persistent XLA compilation cache shared by every run of the test session, in this process,
its xdist workers and the CLI subprocesses (which inherit the environment). Compilation dominates a CPU test run,
and the tiny config's train step and sampler are the same programs in most runs.

And XLA's backend (LLVM) optimisations off for every program of the session: a test runs a program a few times,
so compiling it fast matters more than running it fast (a DDGAN train step: ~8 s to compile instead of ~50 s).
The subprocesses keep these flags (tests.tiny.xla_flags adds their device count to them)."""
import os
import tempfile

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # set by the xdist controller, its workers inherit it
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ddjax-xla-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
