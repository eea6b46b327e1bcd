"""CIFAR-10 with the DDPM paper's settings and network (Ho et al. 2020, appendix B): the released CIFAR-10 model.

Unconditional; T = 1000, linear β 1e-4..0.02, ε-prediction, L_simple, fixed variance σ² = β (the released model's
'fixedlarge'); Adam lr 2e-4 with 5000 warm-up steps, batch 128, grad clip 1, dropout 0.1, EMA 0.9999, random
flips, 800k steps. The network is DDPM's own on the ADM U-Net (model.layout='ddpm'): ch 128, ch_mult (1, 2, 2, 2)
over 32, 16, 8, 4 px, two res blocks per level, single-head attention at 16×16, 35,746,307 parameters. Its
weights as diffusers ships them (google/ddpm-cifar10-32, diffusion_pytorch_model.safetensors) import with
`--mode import --config.weights=<file>`. Published: FID 3.17 and NLL ≤ 3.75 bits/dim (Table 1), 50k samples by
ancestral sampling over all 1000 steps, as sample.* here.
Prepare the data first: `tfds build cifar10 --data_dir <dir>`.
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('_adm.py')).get_config(
      layout='ddpm', ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), num_heads=1,
      dropout=0.1)
  config.data.update(dataset='cifar10', image_size=32, num_channels=3, num_classes=0, batch_size=128,
                     random_flip=True, shuffle_buffer=50_000)
  config.diffusion.update(num_timesteps=1000, schedule='linear', prediction='eps', variance='fixed_large',
                          loss='simple')
  config.train.update(num_steps=800_000, learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999,
                      p_uncond=0.0, log_every=500, checkpoint_every=10_000, sample_every=25_000)
  config.sample.update(sampler='ddpm', guidance=0.0, num_samples=64, batch_size=64)
  config.sample.num_steps = 1000  # ancestral sampling over all T steps, as the paper
  config.sweep.update(sampler='ddpm,ddim', guidance='0', num_samples=10_000)  # unconditional: no guidance
  config.eval.num_samples = 50_000
  return config
