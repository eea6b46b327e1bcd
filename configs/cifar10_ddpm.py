"""CIFAR-10 with the DDPM paper's settings (Ho et al. 2020, appendix B), on the seed's U-Net.

Unconditional; T = 1000, linear β 1e-4..0.02, ε-prediction, L_simple, fixed variance σ² = β (the released
CIFAR-10 model's 'fixedlarge'); Adam lr 2e-4 with 5000 warm-up steps, batch 128, grad clip 1, dropout 0.1, EMA
0.9999, random flips, 800k steps. The network: ch 128, ch_mult (1, 2, 2, 2) over 32, 16, 8, 4 px, two res blocks
per level, t_dim 4·ch. What the seed's block vocabulary cannot express: DDPM's attention is plain self-attention
at 16×16 only, where the seed's `atn` (a ViT block over patches of at most attn_resolution² = 256 tokens) runs at
every level; and DDPM's up path has three res blocks per level fed by a skip from every down block, where the
seed's has the same block list as the down path after one skip concat per level. So it has 31,080,835
parameters (`python -m ddjax.benchmark --what train`), against the paper's 35.7M.
Prepare the data first: `tfds build cifar10 --data_dir <dir>`.
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('digits.py')).get_config()
  config.data.update(dataset='cifar10', image_size=32, num_channels=3, num_classes=0, batch_size=128,
                     random_flip=True, shuffle_buffer=50_000)
  config.diffusion.update(num_timesteps=1000, schedule='linear', prediction='eps', variance='fixed_large',
                          loss='simple')
  del config.model['ch_mult']  # digits.py's is an int (the seed's doubling); this one is the per-level tuple
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.update(ch=128, num_levels=4, blocks='res,res,atn', attn_resolution=16, num_heads=4, dropout=0.1,
                      t_dim=512, c_dim=512)
  config.train.update(num_steps=800_000, learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999,
                      p_uncond=0.0, log_every=500, checkpoint_every=10_000, sample_every=25_000)
  config.sample.update(sampler='ddpm', guidance=0.0, num_samples=64, batch_size=64)
  config.sample.num_steps = 1000  # ancestral sampling over all T steps, as the paper
  config.sweep.update(sampler='ddpm,ddim', guidance='0', num_samples=10_000)  # unconditional: no guidance
  config.eval.num_samples = 50_000
  return config
