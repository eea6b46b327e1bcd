"""LSUN Church 256x256 with the DDGAN paper's settings (the repository's lsun command): T = 4, NCSN++ with nf 64,
ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at 16x16, nz 100, z_emb_dim 256, n_mlp 3; the large
discriminator with ngf 64; EMA 0.999, r1_gamma 1 every 10 steps, Adam lr_d 1e-4 / lr_g 1.6e-4, (0.5, 0.9), cosine
decay, global batch 64 (8 per GPU × 8), random flips; 500 epochs of the 126k church images ≈ 986,000 steps.

Data: TFDS 'lsun/church_outdoor' (`tfds build lsun/church_outdoor --data_dir <dir>` downloads the LMDB archive);
its images have a shortest side of 256 and are centre-cropped to 256x256 as training data is read.
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('digits_ddgan.py')).get_config()
  config.data.update(dataset='lsun/church_outdoor', image_size=256, num_channels=3, num_classes=0, batch_size=64,
                     random_flip=True, shuffle_buffer=10_000)
  config.gan.update(num_timesteps=4, nz=100, z_emb_dim=256, n_mlp=3, discriminator='large', d_ch=64,
                    t_emb_dim=256, r1_gamma=1.0, lazy_reg=10, lr_g=1.6e-4, lr_d=1e-4, lr_decay_steps=986_000)
  config.model.update(ch=64, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
  config.train.update(num_steps=986_000, ema_decay=0.999, log_every=500, checkpoint_every=10_000,
                      sample_every=25_000)
  config.sample.update(num_samples=16, batch_size=16)
  config.eval.update(num_samples=50_000, batch_size=64)
  return config
