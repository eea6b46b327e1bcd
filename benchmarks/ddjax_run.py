"""`python -m ddjax.benchmark` as a subprocess, for the side-by-side peer scripts (which run under another Python or
with torch loaded, so they call ddjax through its CLI)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ddjax_benchmark(flags: list[str], *, python: str = sys.executable) -> dict:
  """The JSON object `python -m ddjax.benchmark <flags>` prints last; exits with its stderr when it fails."""
  completed = subprocess.run([python, '-m', 'ddjax.benchmark', *flags], cwd=REPO, capture_output=True, text=True)
  if completed.returncode:
    sys.exit(f'ddjax.benchmark failed ({completed.returncode}):\n{completed.stderr[-3000:]}')
  return json.loads(completed.stdout.strip().splitlines()[-1])
