"""`--mode sweep` on a tiny checkpoint: its files and their keys, one compiled program for cells that differ only in
η or guidance, resume, bad grids rejected before anything compiles; and the study's wiring and tables."""
import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import checkpoint, config as config_lib, generate, methods, train
from ddjax.evaluation import study, sweep
from ddjax.validation import ConfigError
from tests.test_config import with_settings
from tests.tiny import REPO, run_main, tiny_config, tiny_ddgan_config

# Two η × two guidance weights at one step count: four cells, one compiled program.
GRID = {'sweep.sampler': 'ddim', 'sweep.num_steps': '3', 'sweep.spacing': 'trailing', 'sweep.step_size': '',
        'sweep.eta': '0,1', 'sweep.ddim_scale': '', 'sweep.guidance': '1,2', 'sweep.num_samples': 16}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A workdir with a step-4 checkpoint of the tiny config: its initial state with the EMA weights perturbed (the
  initial U-Net's output layer is zero, so its samples would not depend on the class or the guidance), saved as
  training saves it."""
  workdir = str(tmp_path_factory.mktemp('run'))
  state = methods.build(tiny_config(data_dir)).initial_state()
  leaves, tree = jax.tree.flatten(state.ema_params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  ema_params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  manager = checkpoint.create_manager(workdir)
  checkpoint.save(manager, 4, state.replace(step=jnp.int32(4), ema_params=ema_params))
  checkpoint.wait(manager)
  return workdir


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('cache'))


def sweep_config(data_dir, cache_dir, **overrides):
  return tiny_config(data_dir, **{**GRID, 'eval.metrics': 'offline', 'eval.cache_dir': cache_dir, **overrides})


@pytest.fixture
def recorded(monkeypatch):
  """The sampling programs the sweep builds and the cells it draws (generate_images calls)."""
  calls = {'programs': [], 'drawn': []}
  make_generate_fn, generate_images = generate.make_generate_fn, generate.generate_images

  def counted_make(*args, **kwargs):
    calls['programs'].append(make_generate_fn(*args, **kwargs))
    return calls['programs'][-1]

  def counted_generate(*args, values=None, **kwargs):
    calls['drawn'].append(values)
    return generate_images(*args, values=values, **kwargs)

  monkeypatch.setattr(generate, 'make_generate_fn', counted_make)
  monkeypatch.setattr(generate, 'generate_images', counted_generate)
  return calls


def test_sweep_writes_every_cell_with_one_program_and_resumes(trained, data_dir, cache_dir, recorded):
  config = sweep_config(data_dir, cache_dir)
  records = sweep.sweep(config, trained)
  directory = os.path.join(trained, 'sweep')
  names = ['ddim_n3_trailing_w1_eta0', 'ddim_n3_trailing_w1_eta1', 'ddim_n3_trailing_w2_eta0',
           'ddim_n3_trailing_w2_eta1']
  assert [record['samples'] for record in records] == [f'{name}.npz' for name in names]
  # Cells that differ only in η and guidance: one program, compiled once (they are its arguments).
  [program] = recorded['programs']
  assert program._cache_size() == 1 and len(recorded['drawn']) == 4

  lines = [json.loads(line) for line in open(os.path.join(directory, 'results.jsonl'))]
  assert lines == records
  for record, (eta, guidance) in zip(lines, [(0, 1), (1, 1), (0, 2), (1, 2)]):
    assert {key: record[key] for key in sweep.SETTINGS} == {
        'sampler': 'ddim', 'num_steps': 3, 'spacing': 'trailing', 'step_size': None, 'eta': eta, 'ddim_scale': None,
        'guidance': guidance}
    for metric in ('fd', 'fd_floor', 'precision', 'recall', 'memorisation', 'agreement', 'classifier_accuracy'):
      assert np.isfinite(record[metric]), metric
    assert record['step'] == 4 and record['num_samples'] == 16
  with open(os.path.join(directory, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [row['samples'] for row in rows] == [r['samples'] for r in records] and float(rows[3]['fd']) == pytest.approx(
      records[3]['fd'])
  assert open(os.path.join(directory, 'plot.png'), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

  # The same seeds and labels in every cell; η and guidance change the images.
  saved = [np.load(os.path.join(directory, f'{name}.npz')) for name in names]
  assert all(s['arr_0'].shape == (16, 8, 8, 1) and s['arr_0'].dtype == np.uint8 for s in saved)
  assert all(np.array_equal(s['arr_1'], saved[0]['arr_1']) for s in saved)
  assert not np.array_equal(saved[0]['arr_0'], saved[1]['arr_0'])
  assert not np.array_equal(saved[0]['arr_0'], saved[2]['arr_0'])

  # A restart draws nothing; a cell whose npz is gone is drawn again, alone, and identically.
  recorded['drawn'].clear()
  assert sweep.sweep(config, trained) == records and recorded['drawn'] == []
  redrawn = saved[3]['arr_0']
  os.remove(os.path.join(directory, 'ddim_n3_trailing_w2_eta1.npz'))
  again = sweep.sweep(config, trained)
  assert len(recorded['drawn']) == 1 and recorded['drawn'][0]['eta'] == 1 and recorded['drawn'][0]['guidance'] == 2
  np.testing.assert_array_equal(np.load(os.path.join(directory, 'ddim_n3_trailing_w2_eta1.npz'))['arr_0'], redrawn)
  assert again[3]['fd'] == pytest.approx(records[3]['fd'])
  # Other labels asked for are other samples: nothing of the first sweep is reused.
  recorded['drawn'].clear()
  sweep.sweep(sweep_config(data_dir, cache_dir, **{'sample.class_label': 3, 'sweep.guidance': '1',
                                                    'sweep.eta': '0'}), trained)
  assert len(recorded['drawn']) == 1


BAD_GRIDS = [
    ({'sweep.num_steps': '5,51'}, 'sweep.num_steps'),  # T is 50
    ({'sweep.step_size': '0'}, 'sweep.step_size'),
    ({'sweep.eta': '0,-0.5'}, 'sweep.eta'),
    ({'sweep.ddim_scale': 'nan'}, 'sweep.ddim_scale'),
    ({'sweep.eta': 'zero'}, 'sweep.eta'),
    ({'sweep.num_steps': '5.5'}, 'sweep.num_steps'),
    ({'sweep.sampler': 'ddim,euler'}, 'sweep.sampler'),
    ({'sweep.spacing': 'trailing,linspace'}, 'sweep.spacing'),
    ({'sweep.spacing': ''}, 'sweep.spacing'),
    ({'sweep.num_steps': '', 'sweep.step_size': ''}, 'sweep.num_steps'),
    ({'sweep.eta': '', 'sweep.ddim_scale': ''}, 'sweep.eta'),
    ({'sweep.guidance': ''}, 'sweep.guidance'),
    ({'sweep.guidance': '0,1', 'data.num_classes': 0, 'sample.guidance': 0.0}, 'sweep.guidance'),
    ({'sweep.eta': 1}, 'sweep.eta'),  # a number, not a comma list in a string
    ({'sweep.num_samples': 0}, 'sweep.num_samples'),
]


@pytest.mark.parametrize('settings, key', BAD_GRIDS, ids=[', '.join(map(str, s.items())) for s, _ in BAD_GRIDS])
def test_bad_grid_is_one_line_before_anything_is_built(settings, key, trained, monkeypatch):
  monkeypatch.setattr(methods, 'build', lambda config: pytest.fail('built before the grid was checked'))
  config = with_settings({**GRID, **settings})
  config_lib.validate(config)  # the other modes do not read the grid
  with pytest.raises(ConfigError) as error:
    sweep.sweep(config, trained)
  message = str(error.value)
  assert message.startswith(f'{key}=') and ' is invalid; allowed: ' in message and '\n' not in message, message


def test_grid_of_samplers_and_spacings():
  # Each step count on each grid; DPM-Solver++ and DDPM have no η; the seed's strides have no grid.
  config = with_settings({**GRID, 'sweep.sampler': 'ddim,dpm++2m', 'sweep.num_steps': '5,10',
                          'sweep.spacing': 'even,trailing', 'sweep.step_size': '10', 'sweep.guidance': '1'})
  cells = config_lib.sweep_grid(config)
  assert [(c['sampler'], c['num_steps'], c['spacing'], c['eta']) for c in cells if c['sampler'] == 'dpm++2m'] == [
      ('dpm++2m', 5, 'even', None), ('dpm++2m', 10, 'even', None), ('dpm++2m', 5, 'trailing', None),
      ('dpm++2m', 10, 'trailing', None), ('dpm++2m', 5, None, None)]
  assert len([c for c in cells if c['sampler'] == 'ddim']) == 5 * 2  # × η 0, 1
  assert sweep.cell_name(cells[-1]) == 'dpm++2m_k10_w1' and sweep.cell_label(cells[-1]) == 'dpm++2m stride w=1'
  assert sweep.cell_name(cells[0]) == 'ddim_n5_even_w1_eta0' and sweep.cell_label(cells[0]) == 'ddim even η=0 w=1'


def test_ddgan_is_refused():
  with pytest.raises(ConfigError, match="^method='ddgan' is invalid; allowed: 'diffusion' with --mode sweep"):
    config_lib.validate(tiny_ddgan_config(), mode='sweep')


def test_cli_bad_grid_exits_2_with_one_line(tmp_path):
  result = run_main(tmp_path, extra_args=['--mode', 'sweep'], timeout=120, **{**GRID, 'sweep.eta': '0,-1'})
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      "ddjax: invalid config: sweep.eta='0,-1' is invalid; allowed: a comma list of numbers >= 0"]
  assert not os.path.exists(tmp_path / 'sweep')


def test_shipped_diffusion_configs_have_valid_grids():
  for name in ('digits', 'mnist', 'cifar10_ddpm', 'imagenet64_res'):
    config = config_lib.load_config_module(os.path.join(REPO, 'configs', f'{name}.py')).get_config()
    config_lib.validate(config, device_count=1, mode='sweep')
    assert len(config_lib.sweep_grid(config)) >= 21, name


def test_study_trains_and_sweeps_three_predictions_and_writes_its_table(tmp_path, monkeypatch):
  trained_configs, swept = [], []

  def fake_train(config, workdir):
    trained_configs.append((config.diffusion.prediction, config.train.num_steps, config.seed, workdir))

  def fake_sweep(config, workdir):
    swept.append(workdir)
    quality = {'eps': 20.0, 'v': 15.0, 'x0': 30.0}[config.diffusion.prediction]
    return [{'sampler': 'ddim', 'num_steps': steps, 'spacing': 'trailing', 'step_size': None, 'eta': eta,
             'ddim_scale': None,
             'guidance': 1.0, 'fd': quality / steps + eta, 'fd_floor': 1.0, 'precision': 0.9, 'recall': 0.5,
             'agreement': 0.99, 'samples': 'x.npz'} for steps in (5, 10) for eta in (0.0, 1.0)]

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  monkeypatch.setattr(sweep, 'sweep', fake_sweep)
  records = study.study(tiny_config(**GRID), str(tmp_path))
  assert [c[0] for c in trained_configs] == ['eps', 'v', 'x0']
  assert {c[1:3] for c in trained_configs} == {(4, 0)}  # the same steps and seed
  assert [c[3] for c in trained_configs] == swept == [str(tmp_path / p) for p in ('eps', 'v', 'x0')]
  assert len(records) == 12 and records[0]['prediction'] == 'eps'
  with open(tmp_path / 'study.csv') as f:
    rows = list(csv.DictReader(f))
  assert [row['prediction'] for row in rows] == ['eps'] * 4 + ['v'] * 4 + ['x0'] * 4
  table = (tmp_path / 'study.md').read_text()
  assert '| v | ddim trailing η=0 w=1 | 3.000 | 1.500 |' in table, table
  assert (tmp_path / 'study.png').read_bytes()[:4] == b'\x89PNG'
