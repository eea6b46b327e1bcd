"""Session set-up: one persistent XLA compilation cache shared by every run of the test session, in this process
and in the CLI subprocesses (which inherit the environment). Compilation dominates a CPU test run, and the
tiny config's train step and sampler are the same programs in most runs."""
import os
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='ddjax-xla-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
