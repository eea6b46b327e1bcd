"""CelebA-HQ 256x256 with the DDGAN paper's settings (the repository's celeba_256 command): T = 2, NCSN++ with
nf 64, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 16x16, nz 100, z_emb_dim 256, n_mlp 3; the large
discriminator with ngf 64; EMA 0.9999, r1_gamma 2 every 10 steps, Adam lr_d 1e-4 / lr_g 2e-4, (0.5, 0.9), cosine
decay, global batch 32 (4 per GPU × 8), random flips; 800 epochs of 30k images = 750,000 steps at batch 32.

Data: TFDS 'celeb_a_hq/256', which TFDS cannot download: build the 30k images from the CelebA and CelebA-HQ
delta files as its catalog page says, put them in TFDS's manual_dir and run
`tfds build celeb_a_hq/256 --manual_dir <dir> --data_dir <dir>`; or any TFDS image-folder dataset of the same
images (`data.dataset` is any TFDS name).
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('digits_ddgan.py')).get_config()
  config.data.update(dataset='celeb_a_hq/256', image_size=256, num_channels=3, num_classes=0, batch_size=32,
                     random_flip=True, shuffle_buffer=10_000)
  config.gan.update(num_timesteps=2, nz=100, z_emb_dim=256, n_mlp=3, discriminator='large', d_ch=64,
                    t_emb_dim=256, r1_gamma=2.0, lazy_reg=10, lr_g=2e-4, lr_d=1e-4, lr_decay_steps=750_000)
  config.model.update(ch=64, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
  config.train.update(num_steps=750_000, ema_decay=0.9999, log_every=500, checkpoint_every=10_000,
                      sample_every=25_000)
  config.sample.update(num_samples=16, batch_size=16)
  config.eval.update(num_samples=30_000, batch_size=64)
  return config
