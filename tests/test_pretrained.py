"""Published checkpoints: the torch-free readers, the NVlabs DDGAN generator against its reference code's output
(tests/fixtures/make_ddgan_fixtures.py), the fit check's one-line errors, and `--mode import` end to end: import
with no dataset, sample, eval, refusal of a workdir that has checkpoints, and fine-tuning from the weights."""
import argparse
import json
import os
import pathlib
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from configs import digits_ddgan
from ddjax import pretrained
from ddjax.models import create_model
from ddjax.pretrained import ncsnpp as ncsnpp_converter
from tests.tiny import restore_state, run_main_in_process

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
NETG = str(FIXTURES / 'ddgan_netG_8px.pth')
# The fixture generator's flags beyond configs/digits_ddgan.py's (make_ddgan_fixtures.FLAGS): NVlabs' G is
# unconditional.
FIXTURE_MODEL = {'model.num_res_blocks': 2, 'model.attn_resolutions': (4,), 'data.num_classes': 0}


def fixture_config(**overrides):
  config = digits_ddgan.get_config()
  for key, value in {**FIXTURE_MODEL, **overrides}.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def random_state(prefix: str = '') -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {f'{prefix}conv.weight': rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
          f'{prefix}conv.bias': rng.normal(size=(4,)).astype(np.float32),
          f'{prefix}steps': np.arange(5, dtype=np.int64)}


def assert_same(got: dict, expected: dict):
  assert list(got) == list(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


# -- Reading. ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('legacy', [True, False])
def test_torch_files_in_both_formats_lose_ddps_prefix(tmp_path, legacy):
  path = str(tmp_path / 'netG_1200.pth')
  torch.save({k: torch.from_numpy(v) for k, v in random_state('module.').items()}, path,
             _use_new_zipfile_serialization=not legacy)
  with open(path, 'rb') as f:
    assert (f.read(2) == b'PK') != legacy
  assert_same(pretrained.read_state_dict(path), random_state())


@pytest.mark.parametrize('legacy', [True, False])
def test_a_training_checkpoint_is_unwrapped(tmp_path, legacy):
  """NVlabs' content.pth: the generator's state_dict under 'netG_dict' beside an argparse.Namespace, optimizer
  states and the discriminator's, which the reader never builds."""
  tensors = {k: torch.from_numpy(v) for k, v in random_state('module.').items()}
  content = {'epoch': 3, 'global_step': 1200, 'args': argparse.Namespace(nz=100, lr_g=1.6e-4),
             'netG_dict': tensors, 'optimizerG': {'state': {0: {'exp_avg': torch.ones(2)}},
                                                  'param_groups': [{'lr': 1.6e-4, 'params': [0]}]},
             'netD_dict': {'module.w': torch.zeros(3)}}
  path = str(tmp_path / 'content.pth')
  torch.save(content, path, _use_new_zipfile_serialization=not legacy)
  assert_same(pretrained.read_state_dict(path), random_state())


def test_diffusers_safetensors_and_bin(tmp_path):
  state = random_state()
  safetensors.numpy.save_file(state, str(tmp_path / 'diffusion_pytorch_model.safetensors'))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp_path / 'diffusion_pytorch_model.bin'))
  for name in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'):
    got = pretrained.read_state_dict(str(tmp_path / name))
    assert_same({k: got[k] for k in state}, state)  # safetensors keeps its keys sorted


def test_unreadable_files_are_one_line(tmp_path):
  (tmp_path / 'garbage.safetensors').write_bytes(b'not a safetensors file')
  (tmp_path / 'pickle.pt').write_bytes(pickle.dumps({'w': 1}, protocol=2))
  torch.save([torch.zeros(2)], str(tmp_path / 'list.pt'))
  torch.save({'epoch': 3, 'weights': {'w': torch.zeros(2)}}, str(tmp_path / 'other.pt'))
  for name, message in (('missing.pt', 'cannot read'), ('garbage.safetensors', 'is not a weights file ddjax reads'),
                        ('pickle.pt', 'wrong magic number'), ('list.pt', 'holds no state_dict .* but a list'),
                        ('other.pt', "a dict of 'epoch', 'weights', none")):
    with pytest.raises(pretrained.PretrainedError, match=message) as error:
      pretrained.read_state_dict(str(tmp_path / name))
    assert '\n' not in str(error.value)


# -- The NVlabs generator. -----------------------------------------------------------------------------------------

def test_imported_generator_equals_nvlabs_code():
  """G(x_t, t, z) of the imported weights against the reference's output (through tanh, and without: the same
  weights with not_use_tanh); the parameter count is the reference's."""
  reference = np.load(FIXTURES / 'ddgan_netG_8px.npz')
  config = fixture_config()
  params = pretrained.load_params(NETG, config)
  assert sum(x.size for x in jax.tree.leaves(params)) == 376_241 == sum(
      v.size for v in pretrained.read_state_dict(NETG).values())
  nhwc = lambda x: x.transpose(0, 2, 3, 1)  # noqa: E731
  inputs = (jnp.asarray(nhwc(reference['x_t'])), jnp.asarray(reference['t'], jnp.int32), jnp.asarray(reference['z']))
  for not_use_tanh, expected in ((False, reference['x0']), (True, reference['x0_raw'])):
    config.model.not_use_tanh = not_use_tanh
    got = np.asarray(create_model(config).apply({'params': params}, *inputs, None, train=False))
    expected = nhwc(expected)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), (not_use_tanh, np.abs(got - expected).max())
    assert np.abs(expected).max() > 0.3


def test_the_shapes_reveal_the_flags():
  shapes = {k: v.shape for k, v in pretrained.read_state_dict(NETG).items()}
  assert ncsnpp_converter.architecture(shapes, 8) == {
      'gan.z_emb_dim': 64, 'gan.nz': 16, 'gan.n_mlp': 2, 'model.ch': 16, 'data.num_channels': 1,
      'model.num_res_blocks': 2, 'model.ch_mult': (1, 2), 'model.attn_resolutions': (4,)}


@pytest.mark.parametrize('overrides, message', [
    ({'model.num_res_blocks': 1}, 'the file has 2 res blocks per level; model.num_res_blocks=1'),
    ({'model.ch_mult': (1, 1)}, r'the file has ch_mult \(1, 2\); model.ch_mult=\(1, 1\)'),
    ({'model.attn_resolutions': ()}, r'the file has attention at widths \(4,\) .*model.attn_resolutions=\(\)'),
    ({'gan.nz': 8, 'gan.n_mlp': 3}, 'the file has nz 16; gan.nz=8; the file has n_mlp 2; gan.n_mlp=3'),
    ({'model.ch': 32}, 'the file has nf 16; model.ch=32'),
    ({'data.num_classes': 10}, r'the file has no classes \(unconditional\); data.num_classes=10'),
])
def test_a_file_that_does_not_fit_names_the_flag(overrides, message):
  with pytest.raises(pretrained.PretrainedError, match=message) as error:
    pretrained.load_params(NETG, fixture_config(**overrides))
  assert '\n' not in str(error.value)


def test_a_file_of_no_known_family_names_its_keys(tmp_path):
  path = str(tmp_path / 'other.pt')
  torch.save({k: torch.from_numpy(v) for k, v in random_state().items()}, path)
  with pytest.raises(pretrained.PretrainedError, match=r"no checkpoint family .* its first keys: conv.weight"):
    pretrained.load_params(path, fixture_config())


# -- --mode import, then sample, eval and train on the workdir. ----------------------------------------------------

# Every command's overrides: the fixture's network, a small batch and sample count.
OVERRIDES = {**FIXTURE_MODEL, 'data.batch_size': 16, 'sample.num_samples': 16, 'sample.batch_size': 16,
             'train.log_every': 1, 'train.checkpoint_every': 1, 'train.sample_every': 0}


def cli(workdir, mode, **overrides):
  """`python -m ddjax.main --config configs/digits_ddgan.py` in this process."""
  flags = [f'--config.{k}={v}' for k, v in {**OVERRIDES, **overrides}.items()]
  return run_main_in_process(['--config', 'configs/digits_ddgan.py', '--workdir', workdir, '--mode', mode, *flags])


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """A workdir imported from the fixture generator with a data_dir that holds no dataset."""
  workdir = str(tmp_path_factory.mktemp('imported'))
  no_data = str(tmp_path_factory.mktemp('no_data'))
  result = cli(workdir, 'import', weights=NETG, **{'data.data_dir': no_data})
  assert result.returncode == 0, result.stderr
  assert 'discriminator freshly initialised' in result.stdout
  assert not os.listdir(no_data)
  return workdir, no_data


def test_import_writes_a_step_0_workdir(imported):
  workdir, _ = imported
  config = fixture_config(**{'data.batch_size': 16})
  state = restore_state(workdir, config)
  assert int(state.step) == 0
  expected = pretrained.load_params(NETG, config)
  for tree in (state.ema_params, state.params['generator']):
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
      np.testing.assert_array_equal(got, want)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params['discriminator']))
  assert all(int(np.asarray(x).sum()) == 0 for x in jax.tree.leaves(state.opt_state) if np.asarray(x).dtype == np.int32)
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['weights'] == NETG and saved['model.num_res_blocks'] == 2


def test_sample_needs_no_dataset_and_eval_scores_against_digits(imported, tmp_path_factory):
  workdir, no_data = imported
  result = cli(workdir, 'sample', **{'data.data_dir': no_data})
  assert result.returncode == 0, result.stderr
  samples = np.load(os.path.join(workdir, 'samples', 'samples_16x8x8x1_step0.npz'))
  assert samples['arr_0'].shape == (16, 8, 8, 1) and samples['arr_0'].std() > 0
  assert not os.listdir(no_data)

  data_dir, cache_dir = (str(tmp_path_factory.mktemp(name)) for name in ('digits', 'cache'))
  result = cli(workdir, 'eval', **{'data.data_dir': data_dir, 'eval.metrics': 'offline', 'eval.num_samples': 64,
                                   'eval.batch_size': 64, 'eval.cache_dir': cache_dir})
  assert result.returncode == 0, result.stderr
  record = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))][-1]
  assert record['step'] == 0 and record['fd'] > record['fd_floor'] > 0, record


def test_mismatched_file_and_missing_weights_exit_2_with_one_line(tmp_path):
  workdir = str(tmp_path / 'run')
  result = cli(workdir, 'import', weights=NETG, **{'model.num_res_blocks': 1})
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1 and 'the file has 2 res blocks per level; model.num_res_blocks=1' in (
      result.stderr)
  assert not os.path.exists(workdir)  # nothing written
  result = cli(workdir, 'import')
  assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'weights=None' in result.stderr


def test_a_workdir_with_checkpoints_is_refused(imported):
  workdir, no_data = imported
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  result = cli(workdir, 'import', weights=NETG, **{'data.data_dir': no_data})
  assert result.returncode == 1
  assert result.stderr.count('\n') == 1 and 'already has checkpoints (steps [0])' in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_train_fine_tunes_from_the_imported_weights(imported, tmp_path_factory):
  """One update from the file's weights: Adam's first step moves every generator weight by lr_g·g/(|g| + ε), at
  most lr_g, and the EMA is 0.1·file + 0.9·params (decay min(0.9999, 1/10) at step 0)."""
  source, _ = imported
  workdir = str(tmp_path_factory.mktemp('finetune') / 'run')
  shutil.copytree(source, workdir)
  data_dir = str(tmp_path_factory.mktemp('digits_train'))
  result = cli(workdir, 'train', **{'data.data_dir': data_dir, 'train.num_steps': 1})
  assert result.returncode == 0, result.stderr
  assert 'resumed from' in result.stdout and 'at step 0' in result.stdout
  config = fixture_config(**{'data.batch_size': 16})
  state = restore_state(workdir, config)
  assert int(state.step) == 1
  file_params = jax.tree.leaves(pretrained.load_params(NETG, config))
  moved = [np.abs(np.asarray(p) - f).max() for p, f in zip(jax.tree.leaves(state.params['generator']), file_params)]
  assert 0 < max(moved) <= config.gan.lr_g * (1 + 1e-3)
  for ema, p, f in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params['generator']), file_params):
    np.testing.assert_allclose(ema, 0.1 * f + 0.9 * np.asarray(p), rtol=1e-6, atol=1e-7)
