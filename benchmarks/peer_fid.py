"""FID feature throughput: ddjax's Flax InceptionV3 against pytorch-fid's, side by side in one run.

  python benchmarks/peer_fid.py --ddjax_python .venv/bin/python [--rounds 2] [--batch 50] [--steps 3]

Run it with a Python that has pytorch-fid and torchvision (pip install pytorch-fid torchvision); ddjax runs in
`--ddjax_python` (`python -m ddjax.benchmark --what fid`, a subprocess). Both networks get random weights (the
FID weights file is not needed for throughput) and the same work: a batch of uint8 32×32×3 images scaled to the
network's input range, bilinearly resized to 299×299, through the FID InceptionV3 to the 2048-d pool features.
Each round times ddjax, then the peer; the ratios ddjax/peer of images/s are printed last.
"""
import argparse
import json
import sys

import torch
from pytorch_fid import inception

from side_by_side import ddjax_benchmark, timed


def peer_model() -> torch.nn.Module:
  """pytorch-fid's InceptionV3 (FID variant, pool3 block) with its random initial weights: the FID weights'
  download is skipped by loading nothing."""
  load = torch.nn.Module.load_state_dict
  inception.load_state_dict_from_url = lambda *args, **kwargs: {}
  torch.nn.Module.load_state_dict = lambda *args, **kwargs: None
  try:
    return inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    torch.nn.Module.load_state_dict = load


def peer(batch: int, *, warmup: int, steps: int) -> dict:
  model = peer_model()
  images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)

  @torch.inference_mode()
  def step():
    model(images.float() / 255.0)  # pytorch-fid feeds [0, 1]; the model resizes and scales to [-1, 1]

  seconds = timed(step, warmup=warmup, steps=steps)
  return {'what': 'fid', 'framework': f'torch {torch.__version__}', 'images_per_sec': batch / seconds,
          'ms_per_step': 1e3 * seconds, 'batch_size': batch, 'threads': torch.get_num_threads()}


def ddjax(python: str, batch: int, *, warmup: int, steps: int) -> dict:
  return ddjax_benchmark(['--what', 'fid', '--config', 'configs/cifar10_ddpm.py', f'--config.eval.batch_size={batch}',
                          '--steps', str(steps), '--warmup', str(warmup)], python=python)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--ddjax_python', default=sys.executable, help='a Python with ddjax installed')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--batch', type=int, default=50)
  parser.add_argument('--steps', type=int, default=3, help='timed batches per run')
  parser.add_argument('--warmup', type=int, default=1)
  args = parser.parse_args()
  ratios = []
  for round_index in range(args.rounds):
    print(f'[peer_fid] round {round_index + 1}: ddjax, then pytorch-fid', file=sys.stderr, flush=True)
    ours = ddjax(args.ddjax_python, args.batch, warmup=args.warmup, steps=args.steps)
    theirs = peer(args.batch, warmup=args.warmup, steps=args.steps)
    print(json.dumps({'side': 'ddjax', **ours}), flush=True)
    print(json.dumps({'side': 'pytorch-fid', **theirs}), flush=True)
    ratios.append(ours['images_per_sec'] / theirs['images_per_sec'])
  print('ddjax/pytorch-fid feature images/s: ' + ', '.join(f'{r:.2f}' for r in ratios), flush=True)


if __name__ == '__main__':
  main()
