"""ddjax.tools.profiling: HLO instructions classified by what they compute and where they come from, time shared among
overlapping ops, GPU-style traces (kernels plus derived lines) counted once, and a real XLA:CPU trace."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ddjax.tools import profiling

# The shapes of what XLA:GPU compiles a train step into (cuDNN and cuBLAS custom calls, a Triton GEMM fusion
# that nests its dot, an async all-reduce, a loop), written out: the classification of programs this machine
# cannot compile.
GPU_STYLE_HLO = '''HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_dot (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%gemm_fusion (p0.1: bf16[8,8], p1.1: bf16[8,8]) -> bf16[8,8] {
  %p0.1 = bf16[8,8]{1,0} parameter(0)
  %p1.1 = bf16[8,8]{1,0} parameter(1)
  ROOT %nested = bf16[8,8]{1,0} fusion(%p0.1, %p1.1), kind=kCustom, calls=%fused_dot
}

%fused_reduce (p0.2: f32[8,8]) -> f32[8] {
  %p0.2 = f32[8,8]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %reduce.3 = f32[8]{0} reduce(%p0.2, %zero), dimensions={1}, to_apply=%add
}

%fused_adam (p0.3: f32[8], p1.3: f32[8]) -> f32[8] {
  %p0.3 = f32[8]{0} parameter(0)
  %p1.3 = f32[8]{0} parameter(1)
  ROOT %multiply.4 = f32[8]{0} multiply(%p0.3, %p1.3)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main.9 (x: bf16[8,4,4,16], w: bf16[3,3,16,16], m: bf16[8,8], g: f32[8]) -> f32[8] {
  %x = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %w = bf16[3,3,16,16]{3,2,1,0} parameter(1)
  %m = bf16[8,8]{1,0} parameter(2)
  %g = f32[8]{0} parameter(3)
  %cudnn-conv.7 = (bf16[3,3,16,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp(UNet))/down0_res/Conv_1/conv_general_dilated" source_file="x.py"}
  %cublas-gemm.2 = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%m, %m), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(UNet)/mid_attn/MultiHeadDotProductAttention_0/query/dot_general"}
  %gemm_fusion.1 = bf16[8,8]{1,0} fusion(%m, %m), kind=kCustom, calls=%gemm_fusion, metadata={op_name="jit(step)/jvp(UNet)/Dense_0/dot_general"}
  %all-reduce-start = f32[8]{0} all-reduce-start(%g), replica_groups={}, to_apply=%add, metadata={op_name="jit(step)/psum"}
  %input_reduce_fusion = f32[8]{0} fusion(%gemm_fusion.1), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(step)/jvp(UNet)/down0_res/GroupNorm_0/reduce_sum"}
  %transpose.5 = bf16[8,8]{0,1} transpose(%m), dimensions={1,0}, metadata={op_name="jit(step)/transpose(jvp(UNet))/transpose"}
  %loop_fusion = f32[8]{0} fusion(%g, %g), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(step)/optimizer/mul"}
  %ema_fusion = f32[8]{0} fusion(%g, %loop_fusion), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(step)/ema/mul"}
  %tuple = (f32[8]{0}) tuple(%ema_fusion)
  %while.3 = (f32[8]{0}) while(%tuple), condition=%cond, body=%body
  ROOT %time_embedding = f32[8]{0} fusion(%g, %g), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(step)/jvp(UNet)/sin"}
}
'''


def test_gpu_style_instructions_are_classified_by_kind_phase_and_layer():
  module, instructions = profiling.parse_hlo(GPU_STYLE_HLO)
  assert module == 'jit_step'
  expected = {
      'cudnn-conv.7': ('convolution', 'backward', 'Conv'),
      'cublas-gemm.2': ('matmul', 'forward', 'MultiHeadDotProductAttention'),
      'gemm_fusion.1': ('matmul', 'forward', 'Dense'),  # the dot is two fusions deep
      'all-reduce-start': ('collective', 'other', '-'),
      'input_reduce_fusion': ('reduction', 'forward', 'GroupNorm'),
      'transpose.5': ('copy/transpose', 'backward', 'UNet'),
      'loop_fusion': ('elementwise', 'optimizer', '-'),
      'ema_fusion': ('elementwise', 'ema', '-'),
      'while.3': ('control', 'other', '-'),
      'time_embedding': ('elementwise', 'forward', 'UNet'),
  }
  for name, (kind, phase, layer) in expected.items():
    i = instructions[name]
    assert (i.kind, i.phase, i.layer) == (kind, phase, layer), name


def test_overlapping_ops_share_their_time_evenly():
  times, busy = profiling.shared_time([(0, 10, 'a'), (5, 15, 'b'), (20, 25, 'a'), (21, 22, 'c'), (21, 22, 'c')])
  # a: 0-5 alone, 5-10 with b, 20-25 alone but 21-22 with two c's; b: 5-10 with a, 10-15 alone
  assert times == pytest.approx({'a': 5 + 2.5 + 4 + 1 / 3, 'b': 2.5 + 5, 'c': 2 / 3})
  assert busy == pytest.approx(20.0) and sum(times.values()) == pytest.approx(busy)


def gpu_trace(gpus: int):
  """A trace as a GPU profile writes it: per GPU a stream of kernels and a derived 'XLA Ops' line repeating
  them, and host threads that launch them, also naming hlo_op."""
  processes = {1000: '/host:CPU', **{g + 1: f'/device:GPU:{g}' for g in range(gpus)}}
  threads = {(1000, 1): 'python', **{(g + 1, 7): 'Stream #7(Compute)' for g in range(gpus)},
             **{(g + 1, 9000): 'XLA Ops' for g in range(gpus)}}
  events = []
  for call in range(2):
    for g in range(gpus):
      t = 1000.0 * call
      for op, us in (('cudnn-conv.7', 300.0), ('cudnn-conv.7', 100.0), ('gemm_fusion.1', 200.0),
                     ('loop_fusion', 50.0), ('while.3', 900.0)):  # a conv of two kernels; a loop's span
        args = {'hlo_op': op, 'hlo_module': 'jit_step'}
        events.append({'ph': 'X', 'pid': g + 1, 'tid': 7, 'ts': t, 'dur': us, 'name': f'kernel_{op}',
                       'args': args})
        events.append({'ph': 'X', 'pid': g + 1, 'tid': 9000, 'ts': t, 'dur': us, 'name': op, 'args': args})
        events.append({'ph': 'X', 'pid': 1000, 'tid': 1, 'ts': t, 'dur': 5.0, 'name': op, 'args': args})
        t += us + 10.0  # launch gaps
      events.append({'ph': 'X', 'pid': g + 1, 'tid': 7, 'ts': t, 'dur': 70.0, 'name': 'other_module',
                     'args': {'hlo_op': 'loop_fusion', 'hlo_module': 'jit_other'}})
  return events, processes, threads


@pytest.mark.parametrize('gpus', [1, 2])
def test_a_gpu_trace_counts_each_kernel_once_per_gpu(gpus):
  _, instructions = profiling.parse_hlo(GPU_STYLE_HLO)
  events, processes, threads = gpu_trace(gpus)
  result = profiling.breakdown(events, processes, threads, 'jit_step', instructions, calls=2, wall_s=2e-3)
  ms = lambda us: us / 1e3
  assert result['by_kind'] == pytest.approx({'convolution': ms(400), 'matmul': ms(200), 'elementwise': ms(50)})
  assert result['by_phase'] == pytest.approx({'backward': ms(400), 'forward': ms(200), 'optimizer': ms(50)})
  assert result['busy_ms'] == pytest.approx(ms(650)) and result['wall_ms'] == pytest.approx(1.0)
  assert result['span_ms'] == pytest.approx(ms(650))  # one stream: no overlap
  assert result['top'][0][:4] == ['backward', 'Conv', 'convolution', pytest.approx(ms(400))]
  assert result['top'][0][4] == pytest.approx(2)  # kernels per call and GPU
  assert result['lines'] == {f'/device:GPU:{g} Stream #7(Compute)': 8 for g in range(gpus)}
  # a backend that names the module otherwise in its trace: the instruction names alone decide
  renamed = [{**e, 'args': {**e['args'], 'hlo_module': 'jit_step.7'}} for e in events
             if e['args']['hlo_module'] == 'jit_step']
  assert profiling.breakdown(renamed, processes, threads, 'jit_step', instructions, calls=2,
                             wall_s=2e-3)['by_kind'] == pytest.approx(result['by_kind'])


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8)(jnp.mean(jax.nn.silu(nn.Conv(64, (3, 3))(x)), axis=(1, 2)))


def test_a_cpu_trace_of_a_train_step_gives_the_convolutions_their_whole_time():
  """XLA:CPU's event for an Eigen convolution ends when it is handed to the thread pool; without its 'end:' event
  the convolutions' time would fall between the ops."""
  model = Block()
  x = jnp.ones((16, 32, 32, 64))
  params = jax.jit(model.init)(jax.random.key(0), x[:1])

  @jax.jit
  def step(params, x):
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
    with jax.named_scope('optimizer'):
      return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

  jax.block_until_ready(step(params, x))
  result = profiling.profile(lambda: step(params, x), step.lower(params, x).compile().as_text(), calls=3)
  assert sum(result['by_kind'].values()) == pytest.approx(result['busy_ms'])
  assert 0.7 * result['wall_ms'] < result['busy_ms'] <= 1.01 * result['wall_ms']
  assert result['span_ms'] >= result['busy_ms']
  assert result['by_kind']['convolution'] > 0.5 * result['busy_ms']
  assert {'forward', 'backward', 'optimizer'} <= set(result['by_phase'])
  assert {'Conv', 'Dense'} <= set(result['by_layer'])
  assert 'per call: wall' in profiling.format_breakdown(result)
