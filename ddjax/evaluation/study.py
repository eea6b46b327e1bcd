"""The seeds' study: which prediction type, sampler, grid and number of network evaluations give the best samples.

  python -m ddjax.study --config configs/digits.py --workdir W [--config.<key>=<value> ...]

trains the same network with ε-, v- and x0-prediction (the same seed, data order and number of steps; each in
W/<prediction>/ by the normal train loop, so a rerun resumes), sweeps each final checkpoint (`--mode sweep`, the
sweep.* grid: by default DDIM and DPM-Solver++(2M) on the three grids of sample.spacing) and writes one table,
W/study.csv (every cell and metric) and W/study.md (a table per metric: a row per prediction and sampler setting,
a column per number of network evaluations), and one figure, W/study.png (each metric against the network
evaluations, a line per prediction and setting).

STUDY_DEFAULTS replace the config's values unless given on the command line.
"""
import copy
import os

from absl import app
from ml_collections import config_flags

from ddjax import config as config_lib, main as main_lib, reporting, train
from ddjax.evaluation import sweep

PREDICTIONS = ('eps', 'v', 'x0')
STUDY_DEFAULTS = {
    'train.num_steps': 1000, 'train.sample_every': 0,  # 0: a grid at the end only
    'sweep.sampler': 'ddim,dpm++2m', 'sweep.spacing': 'even,leading,trailing', 'sweep.num_steps': '5,10,20,50',
    'sweep.eta': '0', 'sweep.num_samples': 500, 'sample.batch_size': 500,
    'eval.metrics': 'offline',  # the feature classifier's metrics (FID of 8×8 digits upscaled to 299 px means little)
}
TABLE_METRICS = ('fid', 'fd', 'precision', 'recall', 'agreement')


def study(config, workdir: str) -> list[dict]:
  """Every sweep record of the three runs, each with its 'prediction'; writes the table and the figure."""
  configs = {}
  for prediction in PREDICTIONS:
    configs[prediction] = copy.deepcopy(config)
    configs[prediction].diffusion.prediction = prediction
    config_lib.validate(configs[prediction], mode='sweep')  # all three before the first one trains
  records = []
  for prediction, run_config in configs.items():
    run_dir = os.path.join(workdir, prediction)
    reporting.console(f'study: {prediction}-prediction, {run_config.train.num_steps} steps, in {run_dir}')
    train.train_and_evaluate(run_config, run_dir)
    records += [{'prediction': prediction, **record} for record in sweep.sweep(run_config, run_dir)]
  sweep.write_csv(os.path.join(workdir, 'study.csv'), records)
  with open(os.path.join(workdir, 'study.md'), 'w') as f:
    f.write(markdown_tables(records))
  sweep.plot(os.path.join(workdir, 'study.png'), records, line_of=sweep.cell_label,
             row_of=lambda r: f'{r["prediction"]}-prediction',
             title=f'{config.data.dataset}: {config.train.num_steps} training steps, '
                   f'{config.sweep.num_samples} samples per cell')
  reporting.console(f'study: {len(records)} cells; the table in {os.path.join(workdir, "study.md")} and study.csv, the '
                f'figure in {os.path.join(workdir, "study.png")}')
  return records


def markdown_tables(records: list[dict]) -> str:
  """A markdown table per metric of TABLE_METRICS the records have: a row per prediction and sampler setting
  (sweep.cell_label), a column per number of network evaluations; the FD's heading gives its floor."""
  steps = sorted({record['num_steps'] for record in records})
  rows = {}
  for record in records:
    rows.setdefault((record['prediction'], sweep.cell_label(record)), {})[record['num_steps']] = record
  tables = []
  for metric in (m for m in TABLE_METRICS if any(m in record for record in records)):
    floor = f' (floor {records[0]["fd_floor"]:.3f})' if metric == 'fd' else ''
    lines = [f'{metric}{floor}', '', '| prediction | sampler | ' + ' | '.join(f'{n} NFE' for n in steps) + ' |',
             '|---|---|' + '---|' * len(steps)]
    for (prediction, label), cells in rows.items():
      values = [f'{cells[n][metric]:.3f}' if n in cells and metric in cells[n] else '' for n in steps]
      lines.append(f'| {prediction} | {label} | ' + ' | '.join(values) + ' |')
    tables.append('\n'.join(lines) + '\n')
  return '\n'.join(tables)


def main(argv):
  del argv
  if main_lib.FLAGS['mode'].present:
    main_lib.exit_with('invalid flags: ddjax.study trains and sweeps; it takes no --mode', main_lib.EXIT_CONFIG_ERROR)
  given = config_flags.get_override_values(main_lib.FLAGS['config'])
  for key, value in STUDY_DEFAULTS.items():
    if key not in given:
      section, name = key.split('.')
      main_lib.FLAGS.config[section][name] = value
  main_lib.run_checked('sweep', lambda: study(main_lib.FLAGS.config, main_lib.FLAGS.workdir))


def run():
  """`python -m ddjax.study`; the flags are ddjax.main's (defined when it is imported)."""
  app.run(main, flags_parser=main_lib.parse_flags)
