"""Denoising Diffusion GAN on the bundled 8x8 digits: class-conditional as the diffusion default (G: a class
embedding in the mapping network; D: a projection term), T = 4 denoising steps, a small NCSN++ generator (AdaGN)
and the small time-conditioned discriminator. Trains offline on a 2-core CPU in under 15 minutes and samples with
4 generator calls per image. `--config.data.num_classes=0` makes it unconditional, as the paper's models.

Built on digits.py: its data, sample, eval and parallel sections, without diffusion's own keys.
"""
import pathlib

import ml_collections

from ddjax.config import load_config_module

DIFFUSION_ONLY = {'sample': ('sampler', 'num_steps', 'spacing', 'step_size', 'eta', 'ddim_scale', 'guidance',
                             'clip_x0'),
                  'train': ('learning_rate', 'warmup_steps', 'weight_decay', 'grad_clip', 'p_uncond')}


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('digits.py')).get_config()
  config.method = 'ddgan'
  del config['diffusion'], config['sweep']
  for section, keys in DIFFUSION_ONLY.items():
    for key in keys:
      del config[section][key]
  # Conditional: the unconditional G left 16-25% of its digits ambiguous to a classifier (docs/ddgan.md).
  config.data.update(num_classes=10, batch_size=64)

  config.gan = gan = ml_collections.ConfigDict()
  gan.num_timesteps = 4
  gan.use_geometric = False  # the VP discretisation
  gan.beta_min = 0.1
  gan.beta_max = 20.0
  gan.nz = 16
  gan.z_emb_dim = 64
  gan.n_mlp = 2
  gan.discriminator = 'small'
  gan.d_ch = 8  # the discriminator's ngf
  gan.t_emb_dim = 64  # the width of the discriminator's time embedding (the paper's 256 scored worse here)
  # D at 10x G's rate scored best of the rates measured; from 3e-3 D diverges, and lr_g >= lr_d loses D to
  # chance: docs/ddgan.md.
  gan.r1_gamma = 1.0
  gan.lazy_reg = 15
  gan.lr_g = 1e-4
  gan.lr_d = 1e-3
  gan.beta1 = 0.5
  gan.beta2 = 0.9
  gan.lr_decay_steps = 9000  # the cosine to 1e-5 over this many updates (0 = constant): train.num_steps here

  config.model = model = ml_collections.ConfigDict()
  model.name = 'ncsnpp'
  model.ch = 16  # nf
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = ()
  model.dropout = 0.0
  model.not_use_tanh = False
  model.remat = False

  config.train.update(num_steps=9000, log_every=250, checkpoint_every=1000, sample_every=1000)
  config.eval.bpd_examples = 0  # a GAN has no likelihood
  return config
