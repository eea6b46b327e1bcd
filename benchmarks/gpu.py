"""One GPU, one table: the seed's res-res U-Net trained in bfloat16 and float32, sampled, and the FID network.

  bash benchmarks/gpu.sh                    # installs ddjax (keeping a CUDA jax), then runs this; <= 8 minutes
  GPU_SH_SMOKE=1 bash benchmarks/gpu.sh     # the same runs at digits size, on any machine (the CPU included)

Every figure is one `python -m ddjax.benchmark` subprocess (its last stdout line, a JSON object) with a
timeout, so an out-of-memory batch ends only its own attempt. In order, while the time budget (GPU_SH_BUDGET_S,
seconds) lasts:
1. train configs/imagenet64_res_res.py (synthetic batches of its shapes) at 128 per device in bfloat16 and in
   float32, and in bfloat16 once more with the XLA:CPU kernels forced (DDJAX_FORMULATION=xla_cpu; the first
   bfloat16 run has the plain formulation, DDJAX_FORMULATION=plain): which of the two formulations
   (ddjax/models/xla_cpu.py) is faster on this device;
2. sample: its DDIM step_size 10 with classifier-free guidance (w = 1), bfloat16;
3. fid: the FID Inception network's feature throughput;
4. the largest per-device train batch in each precision: the batch predicted to fill 90% of the memory the
   allocator may hold, from step 1's peak (largest_batch_guess), then a quarter less after each attempt that
   runs out of memory; where the backend reports no memory (the CPU), 256, 384, 512, … until an attempt fails.
   A GPU compile takes about a minute, so a search that steps up from 128 would run out of time first.
The bf16 run at 128 also traces 3 more steps (`--profile 3`): where their time goes, by kind of op (convolution,
matmul, elementwise, ...), pass (forward, backward, optimizer, EMA) and layer, printed after the table with the
step's FLOPs over its convolutions' time (a bound on their rate, as a U-Net's FLOPs are nearly all theirs).
Then the table: images/s, ms per step, compile s, TFLOP per step (ddjax.benchmark.flops_of: XLA's cost
analysis of the step before optimisation), MFU = those FLOPs / step time / the device's peak dense bf16 rate
(for float32 too, so the column compares), peak device memory. Only the first GPU is used
(CUDA_VISIBLE_DEVICES, unless set).
"""
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/imagenet64_res_res.py'
FORMULATION_VARIABLE = 'DDJAX_FORMULATION'  # ddjax/models/xla_cpu.py: 'xla_cpu' or 'plain' on every platform

# Peak dense (no sparsity) BF16 tensor-core rate, TFLOP/s, from each vendor datasheet's table (NVIDIA H100,
# H200, GH200, A100, A10, L4, L40S, HGX B200 datasheets: their "with sparsity" figure halved where only that is
# given), matched against jax's device_kind in this order. GPU_SH_PEAK_TFLOPS overrides it.
PEAK_BF16_TFLOPS = (
    (r'\bGH200\b', 989), (r'\bH200 NVL\b', 835), (r'\bH200\b', 989), (r'\bH100 PCIe\b', 756),
    (r'\bH100 NVL\b', 835), (r'\bH100\b', 989), (r'\bA100\b', 312), (r'\bA10\b', 125), (r'\bL40S\b', 362),
    (r'\bL4\b', 121), (r'\bB200\b', 2250),
)

# Digits-sized stand-ins for a CPU smoke run of every step: the same config file, a 16x16 two-level U-Net.
SMOKE_OVERRIDES = ('--config.data.image_size=16', '--config.model.ch=16', '--config.model.num_levels=2',
                   '--config.model.t_dim=32', '--config.model.c_dim=32', '--config.data.num_classes=10',
                   '--config.eval.batch_size=4')


def peak_tflops(device_kind: str) -> float | None:
  if os.environ.get('GPU_SH_PEAK_TFLOPS'):
    return float(os.environ['GPU_SH_PEAK_TFLOPS'])
  return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, device_kind)), None)


def benchmark(args, *, timeout_s: float, formulation: str | None = None) -> dict | str:
  """The JSON result of `python -m ddjax.benchmark <args>` (with DDJAX_FORMULATION=formulation where given), or
  why there is none ('out of memory', 'timeout after N s', or the last line of its stderr)."""
  command = [sys.executable, '-m', 'ddjax.benchmark', *args]
  env = {**os.environ, FORMULATION_VARIABLE: formulation} if formulation else None
  print(f'$ {f"{FORMULATION_VARIABLE}={formulation} " if formulation else ""}' + ' '.join(command[1:]),
        file=sys.stderr, flush=True)
  try:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired:
    return f'timeout after {timeout_s:.0f} s'
  if done.returncode == 0:
    return json.loads(done.stdout.strip().splitlines()[-1])
  if 'RESOURCE_EXHAUSTED' in done.stderr or 'out of memory' in done.stderr.lower():
    return 'out of memory'
  print(f'[gpu.py] failed (exit {done.returncode}); its stderr ends:\n' + '\n'.join(
      done.stderr.strip().splitlines()[-40:]), file=sys.stderr, flush=True)  # the table keeps one line of it
  return (done.stderr.strip().splitlines() or [f'exit {done.returncode}'])[-1][:200]


def largest_batch_guess(result: dict, batch: int) -> int | None:
  """The largest per-device batch predicted to fit, from a train run at `batch`: its peak memory scaled
  linearly in the batch (an overestimate: the train state does not grow with it) to 90% of the allocator's
  limit, in multiples of 64; None where the backend reports no memory."""
  peak, limit = result.get('peak_device_memory_bytes'), result.get('device_memory_limit_bytes')
  if not peak or not limit:
    return None
  return int(0.9 * limit / (peak / batch)) // 64 * 64


def row(name: str, precision: str, result) -> dict:
  """A table row: the benchmark's JSON and what the table derives from it (MFU for train), or the failure."""
  if isinstance(result, str):
    return {'run': name, 'precision': precision, 'failed': result}
  flops, peak = result.get('flops_per_step'), peak_tflops(result['device_kind'])
  mfu = flops / (result['ms_per_step'] / 1e3) / (peak * 1e12) if flops and peak else None
  return {'run': name, 'precision': precision, **result, 'mfu': mfu}


def format_table(rows: list[dict]) -> str:
  header = ('run', 'precision', 'batch', 'images/s', 'ms/step', 'compile s', 'TFLOP/step', 'MFU', 'peak GiB')
  lines = [' | '.join(header), ' | '.join('---' for _ in header)]
  for r in rows:
    if 'failed' in r:
      lines.append(' | '.join([r['run'], r['precision'], *['-'] * 6, f"failed: {r['failed']}"]))
      continue
    flops, mfu, peak = r.get('flops_per_step'), r.get('mfu'), r.get('peak_device_memory_bytes')
    lines.append(' | '.join([
        r['run'], r['precision'], str(r['batch_size']), f"{r['images_per_sec']:.1f}", f"{r['ms_per_step']:.1f}",
        f"{r['compile_s']:.0f}", f'{flops / 1e12:.3g}' if flops else '-', f'{100 * mfu:.1f}%' if mfu else '-',
        f'{peak / 2**30:.1f}' if peak else '-']))
  return '\n'.join(lines)


def main():
  smoke = os.environ.get('GPU_SH_SMOKE') == '1'
  deadline = time.monotonic() + float(os.environ.get('GPU_SH_BUDGET_S', 1800 if smoke else 420))
  base = ['--config', CONFIG, *(SMOKE_OVERRIDES if smoke else ())]
  timing = ['--steps', '2', '--warmup', '0'] if smoke else ['--steps', '10', '--warmup', '2']
  first_batch, search = (8, (16,)) if smoke else (128, (256, 384, 512, 640, 768, 1024))
  precisions = {'bf16': 'bfloat16', 'f32': 'float32'}

  def run(extra, *, limit_s=600 if smoke else 300, formulation=None):  # XLA:CPU compiles slowly
    remaining = deadline - time.monotonic()
    if remaining <= 20:
      return 'no time left'
    return benchmark([*base, *extra], timeout_s=min(limit_s, remaining), formulation=formulation)

  def train(precision, batch, profile=False, formulation=None):
    return run(['--what', 'train', '--data', 'synthetic', *timing, f'--config.data.batch_size={batch}',
                f'--config.parallel.precision={precisions[precision]}', '--profile', '3' if profile else '0'],
               formulation=formulation)

  first = {p: train(p, first_batch, profile=p == 'bf16', formulation='plain' if p == 'bf16' else None)
           for p in precisions}
  rows = [row(f'train {first_batch}' + (' plain' if p == 'bf16' else ''), p, result) for p, result in first.items()]
  formulations = {'plain': first['bf16'], 'xla_cpu': train('bf16', first_batch, formulation='xla_cpu')}
  rows.insert(1, row(f'train {first_batch} xla_cpu', 'bf16', formulations['xla_cpu']))
  step_size, sample_batch = (100, 8) if smoke else (10, 128)
  rows.append(row(f'sample DDIM step_size {step_size}, CFG w=1', 'bf16', run(
      ['--what', 'sample', f'--config.sample.step_size={step_size}', f'--config.sample.batch_size={sample_batch}',
       '--config.sample.guidance=1.0', '--config.parallel.precision=bfloat16',
       '--steps', '2' if smoke else '3', '--warmup', '0' if smoke else '1'])))
  rows.append(row('fid features', 'f32', run(['--what', 'fid', *timing])))
  for precision in precisions:
    largest, tried = (first_batch, first[precision]), []
    guess = None if isinstance(largest[1], str) else largest_batch_guess(largest[1], first_batch)
    if guess is None:  # up from first_batch until an attempt fails
      for batch in search:
        result = train(precision, batch)
        if isinstance(result, str):
          tried.append(f'{batch}: {result}')
          break
        largest = batch, result
    else:  # down from the guess until an attempt fits
      batch = guess
      while batch > first_batch:
        result = train(precision, batch)
        if not isinstance(result, str):
          largest = batch, result
          break
        tried.append(f'{batch}: {result}')
        if result != 'out of memory':
          break
        batch = batch * 3 // 4 // 64 * 64
    rows.append(row(f"train largest ({'; '.join([str(largest[0]), *tried])})", precision, largest[1]))
  for r in rows:
    if r['run'].startswith('sample') and 'failed' not in r:
      r['run'] += f" ({r['ms_per_network_eval']:.1f} ms/eval, overhead {r['overhead_ratio']:.3f})"
  device = next((r['device_kind'] for r in rows if 'device_kind' in r), 'unknown')
  peak = peak_tflops(device)
  print(f'\ndevice: {device}; MFU against {peak or "an unknown"} TFLOP/s dense bf16 (vendor datasheet; set '
        f'GPU_SH_PEAK_TFLOPS to override){"; SMOKE (digits-sized)" if smoke else ""}')
  print(format_table(rows))
  timed = {name: r['ms_per_step'] for name, r in formulations.items() if not isinstance(r, str)}
  if len(timed) == 2:
    print(f'\nfaster formulation of the train step here: {min(timed, key=timed.get)} '
          f'({", ".join(f"{name} {ms:.1f} ms/step" for name, ms in timed.items())}; ddjax/models/xla_cpu.py)')
  profiled = [r for r in rows if r.get('profile')]
  if profiled:
    sys.path.insert(0, REPO)  # the checkout, installed or not (python -m ddjax.benchmark runs from it too)
    from ddjax.tools.profiling import format_breakdown
  for r in profiled:
    print(f"\nwhere the time of {r['run']} {r['precision']} goes (jax.profiler, ms per step):\n"
          + format_breakdown(r['profile']))
    convolution_ms = r['profile']['by_kind'].get('convolution')
    if convolution_ms and r.get('flops_per_step'):  # nearly all of a U-Net's FLOPs are its convolutions'
      rate = r['flops_per_step'] / (convolution_ms / 1e3) / 1e12
      print(f'the step\'s FLOPs over its convolutions\' time: {rate:.0f} TFLOP/s, an upper bound on their rate'
            + (f' ({100 * rate / peak:.0f}% of the peak)' if peak else ''))


if __name__ == '__main__':
  main()
