"""CIFAR-10 with the DDGAN paper's settings (Xiao et al. 2022; the repository's CIFAR-10 command): T = 4, NCSN++
with nf 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16x16, nz 100, z_emb_dim 256, n_mlp 4; the small
discriminator with ngf 64; EMA 0.9999, r1_gamma 0.02 every 15 steps, Adam lr_d 1.25e-4 / lr_g 1.6e-4 with
(β1, β2) = (0.5, 0.9) and cosine decay, global batch 256 (64 per GPU × 4), random flips; 1800 epochs of 50k
images = 351,562 steps at batch 256. Prepare the data first: `tfds build cifar10 --data_dir <dir>`.
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('digits_ddgan.py')).get_config()
  config.data.update(dataset='cifar10', image_size=32, num_channels=3, num_classes=0, batch_size=256,
                     random_flip=True, shuffle_buffer=50_000)
  config.gan.update(num_timesteps=4, nz=100, z_emb_dim=256, n_mlp=4, discriminator='small', d_ch=64,
                    t_emb_dim=256, r1_gamma=0.02, lazy_reg=15, lr_g=1.6e-4, lr_d=1.25e-4, lr_decay_steps=351_562)
  config.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
  config.train.update(num_steps=351_562, ema_decay=0.9999, log_every=500, checkpoint_every=10_000,
                      sample_every=25_000)
  config.sample.update(num_samples=64, batch_size=64)
  config.eval.num_samples = 50_000
  return config
