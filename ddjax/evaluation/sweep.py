"""`--mode sweep`: one checkpoint, a grid of sampler settings (the sweep.* keys, config.sweep_grid), every cell
sampled with the same seeds and labels and scored with `--mode eval`'s metrics (evaluate.prepare_scoring and
score_samples: FID/IS where the Inception weights are, the offline metrics otherwise or as well). Written to
`<workdir>/sweep/`:

  results.jsonl  one JSON object per cell: its settings (sampler, num_steps, spacing, step_size, eta, ddim_scale,
                 guidance),
                 every metric by name, `samples` (its npz, relative to sweep/), `step` (the checkpoint),
                 `num_samples`, `key` (a hash of every other setting its samples depend on) and `seconds`
  results.csv    this run's cells, one row each
  plot.png       each metric against the network evaluations per sample (NFE, log axis; every sampler evaluates
                 the network once per step, a guided step as one batch of twice the size), one line per sampler,
                 grid, η or s, and guidance
  <cell>.npz     the cell's samples in the ADM format (arr_0 uint8 NHWC, arr_1 the requested labels)

One compiled sampling program per (sampler, steps, grid, guided or not, η or the seed's s): η, s and the guidance weight
are arguments of the program (the sampler's `values`), so cells that differ only in them reuse it. Resumable: a
cell whose results line (same checkpoint, count and key) and npz are both there is not drawn again.
"""
import copy
import csv
import json
import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from ddjax import config as config_lib, data, generate, image_files, methods, parallel, reporting
from ddjax.evaluation import evaluate

RESULTS_FILE = 'results.jsonl'
SETTINGS = ('sampler', 'num_steps', 'spacing', 'step_size', 'eta', 'ddim_scale', 'guidance')
PLOTTED = ('fid', 'is', 'fd', 'precision', 'recall', 'agreement')  # the metrics plotted, when the records have them
SHOWN = ('fid', 'is', 'fd', 'fd_floor', 'precision', 'recall', 'agreement')  # on the console, per cell


def sweep(config, workdir: str) -> list[dict]:
  """The records of every cell of the grid for the checkpoint (newest, or sample.checkpoint_step), in grid order:
  drawn, scored and written, or found finished in `<workdir>/sweep/`."""
  config_lib.validate(config, mode='sweep')  # the grid too: a bad one is one line before anything is compiled
  cells = config_lib.sweep_grid(config)
  data.check_prepared(config, 'sweep')
  params, step = generate.load_ema_params(config, workdir, config.sample.checkpoint_step)
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  references = evaluate.prepare_scoring(config, mesh=mesh)
  directory = os.path.join(workdir, 'sweep')
  num_samples = config.sweep.num_samples
  key = evaluate.settings_key({**drawn_settings(config), 'step': step, 'num_samples': num_samples})
  finished = finished_cells(directory, key)
  rng = jax.random.fold_in(jax.random.key(config.seed), step)  # every cell: the same seeds and labels
  progress = Progress([network_evaluations(cell) for cell in cells])
  programs, records = {}, []
  for cell in cells:
    name = cell_name(cell)
    if evaluate.on_every_process(name in finished):
      records.append(finished[name])
      progress.skip(f'{name}  (found in {RESULTS_FILE})')
      continue
    program = (cell['sampler'], cell['num_steps'], cell['spacing'], cell['step_size'], cell['guidance'] > 0,
               cell['ddim_scale'] is not None)
    if program not in programs:
      programs[program] = generate.make_generate_fn(methods.build(cell_config(config, cell)).sample_fn, mesh)
    began = time.time()
    images, labels = generate.generate_images(
        programs[program], params, rng, mesh=mesh, num_samples=num_samples, batch_size=config.sample.batch_size,
        num_classes=config.data.num_classes, class_label=config.sample.class_label, values=traced_values(cell))
    path = os.path.join(directory, f'{name}.npz')
    if jax.process_index() == 0:
      image_files.save_npz(path, {'arr_0': images, 'arr_1': labels})
    metrics = evaluate.score_samples(config, references, images, labels, mesh=mesh, source=path)
    record = {**cell, **metrics, 'samples': f'{name}.npz', 'step': step, 'num_samples': num_samples, 'key': key,
              'seconds': round(time.time() - began, 1)}
    if jax.process_index() == 0:
      with open(os.path.join(directory, RESULTS_FILE), 'a') as f:
        f.write(json.dumps(record) + '\n')
    records.append(record)
    progress.done(f'{name}  ' + '  '.join(f'{k} {metrics[k]:.4g}' for k in SHOWN if k in metrics))
  if jax.process_index() == 0:
    write_csv(os.path.join(directory, 'results.csv'), records)
    plot(os.path.join(directory, 'plot.png'), records, line_of=cell_label,
         title=f'{workdir}, step {step}, {num_samples} samples per cell')
  reporting.console(f'sweep of step {step}: {len(cells)} cells in {directory} ({RESULTS_FILE}, results.csv, plot.png, '
                'one npz per cell)')
  return records


# -- Cells. ------------------------------------------------------------------------------------------------------

def cell_name(cell: dict) -> str:
  """e.g. 'ddim_n10_trailing_w1_eta0.5', 'ddim_k10_w1_s0.5' (the seed's stride 10, ddim_scale 0.5),
  'dpm++2m_n10_even_w0'."""
  steps = f'k{cell["step_size"]}' if cell['step_size'] else f'n{cell["num_steps"]}_{cell["spacing"]}'
  noise = (f'_eta{cell["eta"]:g}' if cell['eta'] is not None
           else f'_s{cell["ddim_scale"]:g}' if cell['ddim_scale'] is not None else '')
  return f'{cell["sampler"]}_{steps}_w{cell["guidance"]:g}{noise}'


def cell_label(cell: dict) -> str:
  """The cell's line in a plot (everything but its steps): e.g. 'ddim trailing η=0 w=1', 'ddim stride s=0.5 w=1'."""
  noise = (f' η={cell["eta"]:g}' if cell['eta'] is not None
           else f' s={cell["ddim_scale"]:g}' if cell['ddim_scale'] is not None else '')
  grid = 'stride' if cell['step_size'] else cell['spacing']
  return f'{cell["sampler"]} {grid}{noise} w={cell["guidance"]:g}'


def cell_config(config, cell: dict):
  """`config` with the cell's sampler settings in sample.*: what its compiled program is built from."""
  config = copy.deepcopy(config)
  sample_config = config.sample
  sample_config.sampler, sample_config.step_size = cell['sampler'], cell['step_size']
  if cell['step_size'] is None:
    sample_config.num_steps, sample_config.spacing = cell['num_steps'], cell['spacing']
  sample_config.eta = cell['eta'] or 0.0
  sample_config.ddim_scale, sample_config.guidance = cell['ddim_scale'], cell['guidance']
  return config


def traced_values(cell: dict) -> dict:
  """The cell's η, and its guidance and s where its program has them: arguments of the program, not constants."""
  values = {'eta': np.float32(cell['eta'] or 0.0)}
  if cell['guidance'] > 0:
    values['guidance'] = np.float32(cell['guidance'])
  if cell['ddim_scale'] is not None:
    values['ddim_scale'] = np.float32(cell['ddim_scale'])
  return values


def network_evaluations(cell: dict) -> int:
  """What a cell costs, in network evaluations per sample (a guided step is one batch of twice the size)."""
  return cell['num_steps'] * (2 if cell['guidance'] > 0 else 1)


def drawn_settings(config) -> dict:
  """Every setting a cell's samples depend on besides its own (SETTINGS), the checkpoint and the count."""
  settings = evaluate.sample_settings(config)
  for key in (*SETTINGS, 'batch_size'):  # samples do not depend on the batch (per-index keys)
    settings['sample'].pop(key)
  return settings


def finished_cells(directory: str, key: str) -> dict:
  """{cell name: its record} of the cells in `directory`/results.jsonl drawn with `key` whose npz is there (the
  newest record of a cell wins; a line torn by a kill is skipped)."""
  finished = {}
  try:
    with open(os.path.join(directory, RESULTS_FILE)) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return finished
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get('key') == key and os.path.exists(os.path.join(directory, record['samples'])):
      finished[record['samples'].removesuffix('.npz')] = record
  return finished


class Progress:
  """One console line per cell: a bar over the cells, the cell, and an ETA from the network evaluations drawn so
  far (a 1000-step cell costs 100 times a 10-step one)."""

  def __init__(self, costs: list[int]):
    self.costs, self.index, self.drawn_cost, self.drawn_seconds = costs, 0, 0, 0.0
    self.started = time.time()

  def skip(self, message: str):
    self._line(message)

  def done(self, message: str):
    self.drawn_cost += self.costs[self.index]
    self.drawn_seconds = time.time() - self.started
    self._line(message)

  def _line(self, message: str):
    self.index += 1
    total = len(self.costs)
    bar = '#' * (20 * self.index // total)
    left = sum(self.costs[self.index:])
    eta = (f'  ETA {reporting.format_seconds(self.drawn_seconds / self.drawn_cost * left)}'
           if self.drawn_cost and left else '')
    reporting.console(f'sweep [{bar:<20}] {self.index}/{total}  {message}{eta}')


# -- Results. ----------------------------------------------------------------------------------------------------

def write_csv(path: str, records: list[dict]) -> None:
  """The records as CSV, one row each; the columns every key in order of first appearance (None: empty)."""
  columns = list(dict.fromkeys(key for record in records for key in record))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval='')
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in record.items()} for record in records)


def plot(path: str, records: list[dict], *, line_of, title: str, row_of=None) -> None:
  """One panel per metric of PLOTTED the records have, against num_steps (= NFE: one network evaluation per step
  for every sampler) on a log axis, one line per line_of(record); the FD panel also shows the floor (what as many
  real images score) dashed. With row_of, one row of panels per row_of(record) (e.g. the study's prediction
  types), each line drawn in the same style in every row."""
  metrics = [metric for metric in PLOTTED if any(metric in record for record in records)]
  lines = {}  # row -> line label -> its records
  for record in records:
    row = None if row_of is None else row_of(record)
    lines.setdefault(row, {}).setdefault(line_of(record), []).append(record)
  labels = list(dict.fromkeys(label for row_lines in lines.values() for label in row_lines))
  # Ten colours, then the next linestyle: every line stays distinguishable past matplotlib's colour cycle.
  styles = {label: dict(color=f'C{i % 10}', linestyle=('-', '--', ':', '-.')[i // 10 % 4])
            for i, label in enumerate(labels)}
  steps = sorted({record['num_steps'] for record in records})
  figure = Figure(figsize=(4 * len(metrics), 3.4 * len(lines) + 0.4 * (len(labels) // 4 + 1)), layout='constrained')
  panels = figure.subplots(len(lines), len(metrics), squeeze=False)
  for row_panels, (row, row_lines) in zip(panels, lines.items()):
    for axes, metric in zip(row_panels, metrics):
      for label, line in row_lines.items():
        line = sorted((r for r in line if metric in r), key=lambda r: r['num_steps'])
        axes.plot([r['num_steps'] for r in line], [r[metric] for r in line], marker='o', markersize=3, label=label,
                  **styles[label])
      if metric == 'fd':
        floors = [r['fd_floor'] for line in row_lines.values() for r in line]
        axes.axhline(np.mean(floors), color='grey', linestyle='--', label='floor (real)')
      axes.set(xscale='log', xlabel='network evaluations (NFE)', title=metric if row is None else f'{row}: {metric}')
      axes.set_xticks(steps, [str(n) for n in steps], minor=False)
      axes.minorticks_off()
      axes.grid(alpha=0.3)
  handles, legend_labels = panels[0][metrics.index('fd') if 'fd' in metrics else 0].get_legend_handles_labels()
  figure.legend(handles, legend_labels, loc='outside lower center', ncols=min(len(legend_labels), 4),
                fontsize='small')
  figure.suptitle(title, fontsize='medium')
  figure.savefig(path, dpi=100)
