"""Unconditional ImageNet-64 with improved-diffusion's flags (Nichol & Dhariwal 2021): the network of its released
imagenet64_uncond_100M_1500K.pt (L_hybrid) and imagenet64_uncond_vlb_100M_1500K.pt (L_vlb:
--config.diffusion.loss=vlb).

MODEL_FLAGS "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True" over the script's defaults:
ch_mult (1, 2, 3, 4), attention at 16 and 8 px with 4 heads (legacy order), scale-shift norm, dropout 0,
timesteps rescaled to 0..1000; 121,063,942 parameters. DIFFUSION_FLAGS "--diffusion_steps 4000 --noise_schedule
cosine": learned-range variance, L_hybrid (λ = 0.001). TRAIN_FLAGS "--lr 1e-4 --batch_size 128", EMA 0.9999,
1.5M steps. Published: 3.53 bits/dim on the ImageNet-64 validation set (Table 2, the L_vlb model), the full
4000-step bound as ddjax's `eval` NLL computes it (`--config.eval.reference=validation`). Import a checkpoint with
`--mode import --config.weights=<file.pt>`; sampling it needs no dataset.
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('_adm.py')).get_config(
      ch=128, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(16, 8), num_heads=4, scale_shift_norm=True,
      dropout=0.0, rescale_timesteps=True)
  config.data.update(dataset='imagenet_resized/64x64', image_size=64, num_channels=3, num_classes=0,
                     batch_size=128, random_flip=True, shuffle_buffer=50_000)
  config.diffusion.update(num_timesteps=4000, schedule='cosine', prediction='eps', variance='learned_range',
                          loss='hybrid', hybrid_lambda=0.001)
  config.train.update(num_steps=1_500_000, learning_rate=1e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999,
                      p_uncond=0.0, log_every=1000, checkpoint_every=10_000, sample_every=25_000)
  config.sample.update(sampler='ddpm', guidance=0.0, num_samples=64, batch_size=64)
  config.sample.num_steps = 4000  # ancestral sampling over all T steps
  config.sweep.update(sampler='ddpm,ddim', guidance='0', num_samples=10_000)  # unconditional: no guidance
  config.eval.num_samples = 50_000
  return config
