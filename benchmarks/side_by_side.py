"""What the side-by-side peer scripts share: `python -m ddjax.benchmark` as a subprocess (they run under another
Python or with torch loaded, so they call ddjax through its CLI) and the timing of the peer's step."""
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ddjax_benchmark(flags: list[str], *, python: str = sys.executable) -> dict:
  """The JSON object `python -m ddjax.benchmark <flags>` prints last; exits with its stderr when it fails."""
  completed = subprocess.run([python, '-m', 'ddjax.benchmark', *flags], cwd=REPO, capture_output=True, text=True)
  if completed.returncode:
    sys.exit(f'ddjax.benchmark failed ({completed.returncode}):\n{completed.stderr[-3000:]}')
  return json.loads(completed.stdout.strip().splitlines()[-1])


def timed(step, *, warmup: int, steps: int) -> float:
  """The median seconds of `steps` calls of step() after `warmup` untimed ones."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
