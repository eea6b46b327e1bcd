"""Shared base of the five seed ImageNet-64 variants: the digits default with the seed's training settings.

Config files are loaded by path (ml_collections config_flags), so siblings are loaded by path as well.
"""
import pathlib

from ddjax.config import load_config_module


def get_config(*, blocks, ch=128):
  config = load_config_module(pathlib.Path(__file__).with_name('digits.py')).get_config()

  data = config.data
  data.dataset = 'imagenet_resized/64x64'
  data.image_size = 64
  data.num_channels = 3
  data.num_classes = 1000
  data.random_flip = True
  data.batch_size = 1024  # the seed's 128 per GPU x 8 GPUs
  data.shuffle_buffer = 50_000

  diffusion = config.diffusion
  diffusion.num_timesteps = 1000
  diffusion.schedule = 'cosine'
  diffusion.variance = 'learned_range'
  diffusion.loss = 'hybrid'
  diffusion.hybrid_lambda = 0.001

  model = config.model
  model.ch = ch
  model.ch_mult = 1
  model.num_levels = 3  # 64 -> 32 -> 16
  model.blocks = blocks
  model.attn_resolution = 16
  model.t_dim = 512
  model.c_dim = 512
  # 128 per device in float32 fits an 80 GB GPU without remat; on a 40 GB one set model.remat=True or
  # train.grad_accum_steps=2 (each variant's memory: docs/performance.md, from benchmarks/memory.py).
  model.remat = False

  train = config.train
  train.num_steps = 500_000
  train.learning_rate = 3e-4
  train.warmup_steps = 5000
  train.ema_decay = 0.9999
  train.p_uncond = 0.2
  train.log_every = 1000
  train.checkpoint_every = 10_000
  train.sample_every = 25_000

  config.sample.sampler = 'ddim'
  config.sample.step_size = 10  # the seed's best speed/quality trade-off: 100 of the 1000 steps

  config.sweep.update(step_size='10', guidance='0,1,3', num_samples=10_000)  # the seed's stride next to N steps
  config.eval.num_samples = 50_000  # FID-50k
  return config
