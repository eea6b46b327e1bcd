"""ddjax against its PyTorch peer, side by side in one run: diffusers' UNet2DModel + AdamW, and its DDIMScheduler.

  pip install -e '.[bench]'     # diffusers and torch, never needed by ddjax itself
  python benchmarks/peer_diffusers.py [--rounds 3] [--what train|sample|both] [--ch 64] [--train_batch 32]
      [--sample_batch 8]

The pair is one network, DDPM's CIFAR-10 U-Net at width ch (the paper's is 128), class-conditional (10 classes)
at 32×32×3, eps-prediction, linear β over T = 1000, dropout 0:
- ddjax: configs/cifar10_ddpm.py (the ADM U-Net with model.layout='ddpm');
- diffusers: UNet2DModel with google/ddpm-cifar10-32's settings and a class embedding.
Both have the same parameters, in number and in function (tests/test_adm.py checks the forward pass of a
diffusers DDPM file imported into ddjax against diffusers').
Train step: eps MSE, AdamW, grad-norm clip 1, EMA of the weights (ddjax: inside its compiled step; here a
torch._foreach_lerp_). Sampling: 50-step deterministic DDIM (leading spacing 980, 960, …, 0, x0 clipped).

Each round runs ddjax (`python -m ddjax.benchmark`, a subprocess) and the peer (this process), train then
sample, alternating; every JSON line is printed, then the ratios ddjax/peer of images/s and their median.
`--profile N` also traces N more train steps of each side in the first round (ddjax: its `--profile`; the peer:
torch.profiler's self CPU time of each op) and prints where a step's time goes on both, in the same parts.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from side_by_side import ddjax_benchmark, timed

NUM_CLASSES = 10
DDJAX_FLAGS = ['--config', 'configs/cifar10_ddpm.py', '--config.model.dropout=0.0',
               f'--config.data.num_classes={NUM_CLASSES}', '--config.diffusion.variance=fixed_small',
               '--config.sample.sampler=ddim', '--config.sample.num_steps=50', '--config.sample.clip_x0=True']


def log(message: str) -> None:
  print(f'[peer] {message}', file=sys.stderr, flush=True)


def peer_model(ch: int) -> UNet2DModel:
  return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                     block_out_channels=(ch, 2 * ch, 2 * ch, 2 * ch),
                     down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                     up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), downsample_padding=0,
                     flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
                     num_class_embeds=NUM_CLASSES)


def result(what: str, seconds: float, *, batch: int, model) -> dict:
  return {'what': what, 'framework': f'torch {torch.__version__}', 'images_per_sec': batch / seconds,
          'ms_per_step': 1e3 * seconds, 'param_count': sum(p.numel() for p in model.parameters()),
          'batch_size': batch, 'threads': torch.get_num_threads()}


# The parts of a train step both sides can name, for --profile: torch ops by a word in their name.
PARTS = ('3x3 and 1x1 convolutions', 'GroupNorm + SiLU', 'optimizer + EMA', 'the rest', 'no op running')
TORCH_PARTS = (('conv', PARTS[0]), ('group_norm', PARTS[1]), ('silu', PARTS[1]), ('_foreach', PARTS[2]),
               ('lerp', PARTS[2]), ('addcdiv', PARTS[2]), ('adamw', PARTS[2]))


def torch_parts(step, calls: int) -> dict:
  """ms per step of each part: torch.profiler's self CPU time of each op over `calls` steps, by its name; the
  profiled steps' wall time less the ops' is no op running."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
    start = time.perf_counter()
    for _ in range(calls):
      step()
    wall_ms = 1e3 * (time.perf_counter() - start) / calls
  parts = dict.fromkeys(PARTS, 0.0)
  for op in profiler.key_averages():
    part = next((part for word, part in TORCH_PARTS if word in op.key.lower()), PARTS[3])
    parts[part] += op.self_cpu_time_total / 1e3 / calls
  return {**parts, PARTS[4]: wall_ms - sum(parts.values())}


def ddjax_parts(profile: dict) -> dict:
  """ms per step of each part from ddjax.benchmark's `profile`: convolution-kind ops, the GroupNorm layers (their
  SiLU fused in), the optimizer and EMA scopes, the rest of the time ops ran, and the wall time none did."""
  parts = {PARTS[0]: profile['by_kind'].get('convolution', 0.0), PARTS[1]: profile['by_layer'].get('GroupNorm', 0.0),
           PARTS[2]: profile['by_phase'].get('optimizer', 0.0) + profile['by_phase'].get('ema', 0.0)}
  return {**parts, PARTS[3]: profile['busy_ms'] - sum(parts.values()),
          PARTS[4]: profile['wall_ms'] - profile['busy_ms']}


def peer_train(ch: int, batch: int, *, warmup: int, steps: int, profile: int = 0) -> dict:
  """AdamW on the eps MSE at uniform t, grad-norm clip 1, EMA 0.9999: the work of ddjax's train step."""
  torch.manual_seed(0)
  model, noise = peer_model(ch).train(), DDPMScheduler(num_train_timesteps=1000)
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  images, labels = torch.rand(batch, 3, 32, 32) * 2 - 1, torch.randint(0, NUM_CLASSES, (batch,))

  def step():
    t = torch.randint(0, 1000, (batch,))
    eps = torch.randn_like(images)
    loss = torch.nn.functional.mse_loss(model(noise.add_noise(images, eps, t), t, class_labels=labels).sample, eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.9999)

  return {**result('train', timed(step, warmup=warmup, steps=steps), batch=batch, model=model),
          **({'parts_ms': torch_parts(step, profile)} if profile else {})}


def peer_sample(ch: int, batch: int, *, warmup: int, steps: int) -> dict:
  """A 50-step DDIM loop (η = 0) from pure noise, one batch of `batch` per step."""
  torch.manual_seed(0)
  model = peer_model(ch).eval()
  scheduler = DDIMScheduler(num_train_timesteps=1000)
  scheduler.set_timesteps(50)
  labels = torch.randint(0, NUM_CLASSES, (batch,))

  @torch.inference_mode()
  def step():
    x = torch.randn(batch, 3, 32, 32)
    for t in scheduler.timesteps:
      x = scheduler.step(model(x, t, class_labels=labels).sample, t, x).prev_sample

  return result('sample', timed(step, warmup=warmup, steps=steps), batch=batch, model=model)


def ddjax(what: str, ch: int, batch: int, *, warmup: int, steps: int, profile: int = 0) -> dict:
  """The last stdout line of `python -m ddjax.benchmark` on the matched config."""
  batch_key = 'data.batch_size' if what == 'train' else 'sample.batch_size'
  ours = ddjax_benchmark(['--what', what, '--data', 'synthetic', '--steps', str(steps), '--warmup', str(warmup),
                          '--profile', str(profile), *DDJAX_FLAGS, f'--config.model.ch={ch}',
                          f'--config.{batch_key}={batch}'])
  return {**ours, 'parts_ms': ddjax_parts(ours['profile'])} if profile else ours


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=3,
                      help='alternating ddjax/peer rounds (a figure moves 10-15%% from one process to the next)')
  parser.add_argument('--what', choices=('train', 'sample', 'both'), default='both')
  parser.add_argument('--ch', type=int, default=64, help='the first level\'s width (DDPM\'s CIFAR-10 network: 128)')
  parser.add_argument('--train_batch', type=int, default=32)
  parser.add_argument('--sample_batch', type=int, default=8)
  parser.add_argument('--train_steps', type=int, default=10, help='timed train steps per run')
  parser.add_argument('--sample_steps', type=int, default=3, help='timed 50-step sampling batches per run')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--profile', type=int, default=0, help='train steps to profile on each side in round 1')
  args = parser.parse_args()
  runs = [(what, batch, steps) for what, batch, steps in (('train', args.train_batch, args.train_steps),
                                                           ('sample', args.sample_batch, args.sample_steps))
          if args.what in (what, 'both')]
  ratios, parts = {what: [] for what, _, _ in runs}, None
  for round_index in range(args.rounds):
    for what, batch, steps in runs:
      profile = {'profile': args.profile} if what == 'train' and round_index == 0 else {}
      log(f'round {round_index + 1}: ddjax {what}')
      ours = ddjax(what, args.ch, batch, warmup=args.warmup, steps=steps, **profile)
      log(f'round {round_index + 1}: peer {what}')
      peer = (peer_train if what == 'train' else peer_sample)(args.ch, batch, warmup=args.warmup, steps=steps,
                                                                **profile)
      print(json.dumps({'side': 'ddjax', **ours}), flush=True)
      print(json.dumps({'side': 'peer', **peer}), flush=True)
      ratios[what].append(ours['images_per_sec'] / peer['images_per_sec'])
      if 'parts_ms' in ours:
        parts = ours['parts_ms'], peer['parts_ms']
  for what, values in ratios.items():
    print(f'ddjax/peer {what} images/s: ' + ', '.join(f'{r:.2f}' for r in values)
          + f' (median {statistics.median(values):.2f})', flush=True)
  if parts:
    print(f'where a train step\'s time goes, ms ({args.profile} profiled steps each, round 1):\npart | ddjax | peer')
    for part in PARTS:
      print(f'{part} | {parts[0][part]:.0f} | {parts[1][part]:.0f}')
    print(f'a profiled step | {sum(parts[0].values()):.0f} | {sum(parts[1].values()):.0f}', flush=True)


if __name__ == '__main__':
  main()
