"""CIFAR-10 with improved-diffusion's flags (Nichol & Dhariwal 2021): the network of its released
cifar10_uncond_50M_500K.pt (L_hybrid) and cifar10_uncond_vlb_50M_500K.pt (L_vlb: --config.diffusion.loss=vlb).

MODEL_FLAGS "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3" over the
script's defaults: ch_mult (1, 2, 2, 2), attention at 16 and 8 px with 4 heads (legacy order), scale-shift norm,
timesteps rescaled to 0..1000; 52,546,438 parameters. DIFFUSION_FLAGS "--diffusion_steps 4000 --noise_schedule
cosine": learned-range variance, L_hybrid (λ = 0.001). TRAIN_FLAGS "--lr 1e-4 --batch_size 128", EMA 0.9999,
500k steps. Published: 2.94 bits/dim on the CIFAR-10 test set (Table 2, the L_vlb model), the full 4000-step
bound as ddjax's `eval` NLL computes it. Import a checkpoint with `--mode import --config.weights=<file.pt>`.
Prepare the data first: `tfds build cifar10 --data_dir <dir>`.
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('_adm.py')).get_config(
      ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8), num_heads=4, scale_shift_norm=True,
      dropout=0.3, rescale_timesteps=True)
  config.data.update(dataset='cifar10', image_size=32, num_channels=3, num_classes=0, batch_size=128,
                     random_flip=True, shuffle_buffer=50_000)
  config.diffusion.update(num_timesteps=4000, schedule='cosine', prediction='eps', variance='learned_range',
                          loss='hybrid', hybrid_lambda=0.001)
  config.train.update(num_steps=500_000, learning_rate=1e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999,
                      p_uncond=0.0, log_every=500, checkpoint_every=10_000, sample_every=25_000)
  config.sample.update(sampler='ddpm', guidance=0.0, num_samples=64, batch_size=64)
  config.sample.num_steps = 4000  # ancestral sampling over all T steps
  config.sweep.update(sampler='ddpm,ddim', guidance='0', num_samples=10_000)  # unconditional: no guidance
  config.eval.num_samples = 50_000
  return config
