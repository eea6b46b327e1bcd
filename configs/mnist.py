"""MNIST (TFDS 'mnist', 28x28): class-conditional IDDPM + classifier-free guidance, the digits recipe scaled up.

Prepare the data first: `tfds build mnist --data_dir <dir>` (then --config.data.data_dir=<dir>).
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('digits.py')).get_config()
  config.data.dataset = 'mnist'
  config.data.image_size = 28
  config.data.shuffle_buffer = 60_000
  config.model.update(ch=64, num_levels=3, attn_resolution=7)  # 28 -> 14 -> 7
  config.train.update(num_steps=20_000, learning_rate=2e-4, warmup_steps=1000, ema_decay=0.9999,
                      log_every=100, checkpoint_every=2000, sample_every=2000)
  config.eval.num_samples = 10_000
  return config
