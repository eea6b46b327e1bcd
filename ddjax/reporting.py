"""What a run reports: console lines (process 0 only) and the metric log (metrics.jsonl + clu's TensorBoard
writer)."""
import json
import os

import jax
from clu import metric_writers


class MetricLog:
  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.enabled, asynchronous=False)
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a') if self.enabled else None

  def write(self, step: int, scalars: dict):
    self.writer.write_scalars(step, scalars)
    if self.jsonl:
      self.jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}}) + '\n')
      self.jsonl.flush()

  def close(self):
    self.writer.close()
    if self.jsonl:
      self.jsonl.close()


def console(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'
