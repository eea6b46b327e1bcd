"""Class-conditional ImageNet-64 with guided-diffusion's flags (Dhariwal & Nichol 2021, "ADM (dropout)"): the
network of its released 64x64_diffusion.pt.

MODEL_FLAGS "--attention_resolutions 32,16,8 --class_cond True --dropout 0.1 --image_size 64 --learn_sigma True
--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True
--use_scale_shift_norm True": ch_mult (1, 2, 3, 4), 1000 classes and no null class (trained without label
dropout, so no classifier-free guidance); 295,904,454 parameters. "--diffusion_steps 1000 --noise_schedule cosine",
learned-range variance, L_hybrid. Training as the paper's Table: batch 2048, lr 3e-4, 540k steps, EMA 0.9999.
Published: FID 2.07 against the ImageNet-64 training set, 50k samples by ancestral sampling on 250 evenly spaced
steps (guided-diffusion's `--timestep_respacing 250`), as sample.* here. Import the checkpoint with
`--mode import --config.weights=64x64_diffusion.pt`; sampling it needs no dataset.
"""
import pathlib

from ddjax.config import load_config_module


def get_config():
  config = load_config_module(pathlib.Path(__file__).with_name('_adm.py')).get_config(
      ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8), num_head_channels=64,
      scale_shift_norm=True, resblock_updown=True, attention_order='new', dropout=0.1,
      remat=True)  # 256 images per device (2048 over 8) fit an 80 GB GPU only with remat (docs/performance.md)
  config.data.update(dataset='imagenet_resized/64x64', image_size=64, num_channels=3, num_classes=1000,
                     batch_size=2048, random_flip=True, shuffle_buffer=50_000)
  config.diffusion.update(num_timesteps=1000, schedule='cosine', prediction='eps', variance='learned_range',
                          loss='hybrid', hybrid_lambda=0.001)
  config.train.update(num_steps=540_000, learning_rate=3e-4, warmup_steps=0, grad_clip=0.0, ema_decay=0.9999,
                      p_uncond=0.0, log_every=1000, checkpoint_every=10_000, sample_every=25_000)
  config.sample.update(sampler='ddpm', guidance=0.0, num_samples=64, batch_size=64)
  config.sample.update(num_steps=250, spacing='even')  # guided-diffusion's --timestep_respacing 250
  config.sweep.update(sampler='ddpm,ddim', guidance='0', num_samples=10_000)  # no null class: no guidance
  config.eval.num_samples = 50_000
  return config
