"""Memory of one device's compiled train step, by config, precision and remat: the ImageNet-64 seed configs by
default, any shipped config by name (the DDGAN ones too).

The config's method's real train step (methods.diffusion / methods.ddgan train_step) at `--per_device` images (by
default the config's global batch over 8 devices: the seed's 128 for ImageNet-64), with axis_name=None: the
per-device program of data parallelism (the gradient pmeans are the only difference). DDGAN's lazy R1 branch
(a double backward under lax.cond) is in the program, so its figures cover the R1 steps. Compiled on
ShapeDtypeStructs with the state donated, as training does, and never run. Figures are XLA's `memory_analysis()` of the compiled program:
  temp    activations kept for the backward pass and other scratch buffers
  args    the inputs: the TrainState (params, EMA, AdamW moments, step, rng) and the batch
  output  the new TrainState and the metrics; with the state donated it is written over the arguments
  total   args + temp + output - aliased (the donated part), the buffers live at the peak
(generated code is not counted). The XLA:CPU figures are the CPU backend's buffer assignment; a GPU's
differs somewhat (other fusions, convolution workspace).

Run: python benchmarks/memory.py [--configs imagenet64_res,cifar10_ddgan] [--precisions float32] [--remat off,on]
                                 [--per_device 128] [--grad_accum_steps 1]
"""
import argparse
import functools
import pathlib
import time

import jax

from ddjax import methods
from ddjax.tools.benchmark import abstract_batch, flops_of
from ddjax.config import load_config_module

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
VARIANTS = tuple(f'imagenet64_{name}' for name in ('res', 'res_conv', 'res_res', 'res_large', 'res_res_atn'))
DEVICES = 8  # the --per_device default: a config's global batch split over one 8-GPU host
# XLA:CPU expands jax.checkpoint's optimisation barriers before its last CSE pass, which then merges the
# recomputation back into the forward pass and undoes remat; XLA:GPU keeps them. Keeping them on CPU too
# makes the CPU figures show what remat does on a GPU.
CPU_OPTIONS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}
GIB = 2.0 ** 30


def compile_train_step(config, per_device: int):
  """(parameter count, the compiled train step, its FLOPs: with grad_accum_steps k, one micro-batch's) for
  `config` at `per_device` images."""
  method = methods.build(config)
  step = functools.partial(method.train_step, axis_name=None)
  state, batch = method.abstract_state(), abstract_batch(config, per_device)
  options = CPU_OPTIONS if jax.default_backend() == 'cpu' else None
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile(compiler_options=options)
  return sum(p.size for p in jax.tree.leaves(state.params)), compiled, flops_of(step, state, batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--configs', default=','.join(VARIANTS), help='configs/<name>.py names, comma list')
  parser.add_argument('--precisions', default='float32,bfloat16', help='parallel.precision values')
  parser.add_argument('--remat', default='off,on', help='model.remat values, comma list of off and on')
  parser.add_argument('--per_device', type=int, default=0,
                      help=f'images per device (0: the config\'s data.batch_size / {DEVICES})')
  parser.add_argument('--grad_accum_steps', type=int, default=1, help='micro-batches per device batch')
  args = parser.parse_args()

  print(f'train step per device, grad_accum_steps {args.grad_accum_steps}; XLA:{jax.default_backend().upper()} '
        'memory analysis, compiled and not run (GiB)')
  print(f'{"config":<24} {"batch":>5} {"precision":<9} {"remat":<5} {"params":>11} {"temp":>7} {"args":>7} '
        f'{"output":>7} {"aliased":>7} {"total":>7} {"TFLOP":>6} {"compile":>8}')
  for name in args.configs.split(','):
    for precision in args.precisions.split(','):
      for remat in args.remat.split(','):
        config = load_config_module(CONFIGS / f'{name}.py').get_config()
        per_device = args.per_device or config.data.batch_size // DEVICES
        config.parallel.precision = precision
        config.model.remat = remat == 'on'
        config.train.grad_accum_steps = args.grad_accum_steps
        start = time.perf_counter()
        num_params, compiled, step_flops = compile_train_step(config, per_device)
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        temp, arguments = memory.temp_size_in_bytes, memory.argument_size_in_bytes
        output, aliased = memory.output_size_in_bytes, memory.alias_size_in_bytes
        total = temp + arguments + output - aliased
        tflop = f'{step_flops / 1e12:6.2f}' if step_flops else f'{"-":>6}'
        print(f'{name:<24} {per_device:>5} {precision:<9} {remat:<5} {num_params:>11,} {temp / GIB:7.2f} '
              f'{arguments / GIB:7.2f} {output / GIB:7.2f} {aliased / GIB:7.2f} {total / GIB:7.2f} {tflop} '
              f'{seconds:7.0f}s', flush=True)


if __name__ == '__main__':
  main()
