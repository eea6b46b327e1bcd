"""Where a compiled program's time goes: a `jax.profiler` trace of a few calls, every op's time given to the HLO
instruction it ran (the trace events' `hlo_op`), and that instruction classified three ways from the compiled
program's text:

- kind, what it computes: convolution, matmul, collective, reduction, copy/transpose, elementwise (by its opcode,
  a fusion by the ops it fuses, a custom call by its target: cuDNN's convolutions, cuBLAS's matmuls);
- phase, from its op_name metadata: forward, backward (under JAX's `transpose(`), optimizer and ema (the train
  steps' named scopes), other;
- layer, the Flax module it comes from: the innermost `<Class>_<n>` of its op_name (Conv, GroupNorm, Dense,
  MultiHeadDotProductAttention, ...), else the top module (UNet), else '-'.

Figures in ms per call, on one timeline (a GPU, averaged over the GPUs; or the host, its CPU devices together):
the wall time of a traced call, the busy time (the union of the ops' intervals), and the busy time by each of the
three and by (phase, layer, kind). Where ops overlap (XLA:CPU runs independent ops side by side on its thread
pool) each moment is shared evenly among the ops then running, so the parts add up to the busy time; on a GPU
the kernels of one stream do not overlap. `span_ms`, the ops' spans summed, says how much they overlap: on
XLA:CPU a lot (1.7× the busy time in a 35M-parameter U-Net's train step), and an elementwise pass launched beside
a convolution waits for a pool thread the convolution holds, so there the small ops' shares run high and the
convolutions' low. Control-flow instructions (while, conditional, call) are left out: the
ops of their bodies are events of their own.
"""
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

CONTROL = frozenset({'while', 'conditional', 'call'})
COLLECTIVES = frozenset({'all-reduce', 'all-reduce-start', 'all-reduce-done', 'all-gather', 'all-gather-start',
                         'all-gather-done', 'reduce-scatter', 'collective-permute', 'collective-permute-start',
                         'collective-permute-done', 'all-to-all'})
# Trace lines a profiler derives from the kernels on a GPU (one event per HLO op spanning its kernels, ...):
# counting them would count the kernels twice.
DERIVED_LINES = ('XLA Ops', 'XLA Modules', 'Framework', 'Steps', 'Source', 'TensorFlow', 'Launch Stats')

_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'(?<![\w.\-%])([a-z][a-z0-9\-]*)\(')
_CALLS = re.compile(r'\bcalls=%?([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_MODULE_INSTANCE = re.compile(r'([A-Z][A-Za-z0-9]*)_\d+')
_MODULE = re.compile(r'[A-Z][A-Za-z0-9]*')


@dataclasses.dataclass(frozen=True)
class Instruction:
  opcode: str
  kind: str   # convolution | matmul | collective | reduction | copy/transpose | elementwise | control
  phase: str  # forward | backward | optimizer | ema | other
  layer: str  # the Flax module class, or '-'


def kind_of(opcode: str, fused_opcodes: frozenset, target: str) -> str:
  """What an instruction computes, from its opcode, the opcodes it fuses and its custom-call target."""
  ops = fused_opcodes | {opcode}
  if opcode in CONTROL:
    return 'control'
  if ops & COLLECTIVES:
    return 'collective'
  if 'convolution' in ops or 'conv' in target.lower():
    return 'convolution'
  if 'dot' in ops or re.search(r'gemm|matmul|cublas', target, re.IGNORECASE):
    return 'matmul'
  if ops & {'reduce', 'reduce-window', 'scatter', 'select-and-scatter'}:
    return 'reduction'
  if 'transpose' in ops or opcode == 'copy':
    return 'copy/transpose'
  return 'elementwise'


def phase_and_layer(op_name: str) -> tuple[str, str]:
  """(phase, layer) of an op from its op_name metadata, e.g. 'jit(step)/transpose(jvp(UNet))/down0/Conv_1/...'."""
  parts = op_name.split('/')
  if 'optimizer' in parts:
    phase = 'optimizer'
  elif 'ema' in parts:
    phase = 'ema'
  elif any(part.startswith('transpose(') for part in parts):
    phase = 'backward'
  else:
    phase = None
  layer = top = None
  for part in parts:
    bare = re.sub(r'^(?:\w+\()+|\)+$', '', part)  # jvp(UNet), transpose(jvp(UNet)) -> UNet
    instance = _MODULE_INSTANCE.fullmatch(bare)
    if instance:
      layer = instance.group(1)
    elif top is None and _MODULE.fullmatch(bare):
      top = bare
  layer = layer or top
  return phase or ('forward' if layer else 'other'), layer or '-'


def parse_hlo(text: str) -> tuple[str, dict[str, Instruction]]:
  """(module name, every instruction of every computation by name) from a compiled program's `as_text()`."""
  module = re.match(r'HloModule ([\w.\-]+)', text).group(1)
  raw, computation = {}, None
  opcodes_in, callees_of = collections.defaultdict(set), collections.defaultdict(set)  # by computation
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    opcode = instruction and _OPCODE.search(instruction.group(2))
    if not opcode or computation is None:
      continue
    name, rest = instruction.groups()
    calls, target, op_name = _CALLS.search(rest), _TARGET.search(rest), _OP_NAME.search(rest)
    raw[name] = (opcode.group(1), calls.group(1) if calls else None, target.group(1) if target else '',
                 op_name.group(1) if op_name else '')
    opcodes_in[computation].add(opcode.group(1))
    if calls:
      callees_of[computation].add(calls.group(1))

  def fused(computation, seen=frozenset()):
    """The opcodes of a called computation and of the computations it calls in turn (nested fusions)."""
    seen = seen | {computation}
    return frozenset(opcodes_in[computation]).union(*(fused(c, seen) for c in callees_of[computation] - seen))

  instructions = {}
  for name, (opcode, calls, target, op_name) in raw.items():
    fused_opcodes = fused(calls) if calls else frozenset()  # a fusion's (or an async wrapper's) ops
    instructions[name] = Instruction(opcode, kind_of(opcode, fused_opcodes, target), *phase_and_layer(op_name))
  return module, instructions


def trace_events(log_dir: str) -> tuple[list[dict], dict, dict]:
  """(events, process names by pid, thread names by (pid, tid)) of the newest trace under `log_dir`."""
  runs = glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*'))
  path, = glob.glob(os.path.join(max(runs, key=os.path.getmtime), '*.trace.json.gz'))
  with gzip.open(path, 'rt') as f:
    events = json.load(f)['traceEvents']
  metadata = [e for e in events if e.get('ph') == 'M']
  processes = {e['pid']: e['args']['name'] for e in metadata if e['name'] == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in metadata if e['name'] == 'thread_name'}
  return events, processes, threads


def line_name(processes, threads, event) -> str:
  """'<process> <thread>' of an event, less a thread's numeric id (XLA:CPU's pool threads: tf_XLAEigen/-5018...)."""
  thread = re.sub(r'/-?\d+$', '', str(threads.get((event['pid'], event['tid']), event['tid'])))
  return f"{processes.get(event['pid'], event['pid'])} {thread}"


def spans(events, names: set) -> list[tuple[float, float, dict]]:
  """(start, stop, event) of each op event (its `hlo_op` in `names`). XLA:CPU's event for an op that runs on the
  thread pool (an Eigen convolution) ends when the op is handed over; an 'end: <op>' event marks when it
  completed, and is matched to the op's events first in, first out."""
  events = sorted(events, key=lambda e: e['ts'])
  ends = collections.defaultdict(collections.deque)
  for e in events:
    if e['name'].startswith('end: '):
      ends[e['pid'], e['name'][5:]].append(e['ts'] + e['dur'])
  result = []
  for e in events:
    if e.get('args', {}).get('hlo_op') in names:
      finished = ends[e['pid'], e['args']['hlo_op']]
      result.append((e['ts'], max(e['ts'] + e['dur'], finished.popleft() if finished else 0.0), e))
  return result


def shared_time(intervals: list[tuple[float, float, object]]) -> tuple[collections.Counter, float]:
  """(time of each label, busy time): each moment at which k intervals are open is split evenly among their k
  labels, so the labels' times add up to the busy time (the length of the intervals' union)."""
  boundaries = sorted([(start, 1, label) for start, _, label in intervals]
                      + [(stop, -1, label) for _, stop, label in intervals], key=lambda b: (b[0], b[1]))
  times, open_labels, busy, last = collections.Counter(), collections.Counter(), 0.0, None
  for at, change, label in boundaries:
    active = sum(open_labels.values())
    if active and at > last:
      for open_label, count in open_labels.items():
        times[open_label] += (at - last) * count / active
      busy += at - last
    open_labels[label] += change
    if not open_labels[label]:
      del open_labels[label]
    last = at
  return times, busy


def breakdown(events, processes, threads, module: str, instructions: dict, *, calls: int, wall_s: float) -> dict:
  """ms per call of the module's ops (the events that name one of its instructions as `hlo_op`, and the module as
  `hlo_module` where they name one), by kind, phase, layer and (phase, layer, kind), on one timeline: a GPU
  (figures averaged over the GPUs, only their kernels' lines counted), or the host, its CPU devices together.
  Where no event names the module (a backend that spells it otherwise), the instruction names alone decide."""
  names = {name for name, i in instructions.items() if i.kind != 'control'}
  events = [e for e in events if e.get('ph') == 'X']
  named = any(e.get('args', {}).get('hlo_module') == module for e in events)
  on_module = [e for e in events if (not named or e.get('args', {}).get('hlo_module', module) == module)
               and (e.get('args', {}).get('hlo_op') in names or e['name'].startswith('end: '))]
  if any(processes.get(e['pid'], '').startswith('/device:') for e in on_module):
    on_module = [e for e in on_module if processes.get(e['pid'], '').startswith('/device:')
                 and not threads.get((e['pid'], e['tid']), '').startswith(DERIVED_LINES)]
  ops = spans(on_module, names)
  timelines = {e['pid'] for _, _, e in ops} or {None}
  per_call = 1e-3 / (calls * len(timelines))  # µs over calls and timelines -> ms per call and timeline
  times, busy = collections.Counter(), 0.0
  for timeline in timelines:
    labels = [(start, stop, e['args']['hlo_op']) for start, stop, e in ops if e['pid'] == timeline]
    timeline_times, timeline_busy = shared_time(labels)
    times.update(timeline_times)
    busy += timeline_busy
  sums = {key: collections.Counter() for key in ('kind', 'phase', 'layer', 'part')}
  counts = collections.Counter()
  for _, _, e in ops:
    i = instructions[e['args']['hlo_op']]
    counts[i.phase, i.layer, i.kind] += 1 / (calls * len(timelines))
  for name, time_us in times.items():
    i = instructions[name]
    for key, value in (('kind', i.kind), ('phase', i.phase), ('layer', i.layer), ('part', (i.phase, i.layer, i.kind))):
      sums[key][value] += time_us * per_call
  ordered = lambda counter: dict(sorted(counter.items(), key=lambda kv: -kv[1]))
  return {
      'wall_ms': 1e3 * wall_s / calls,
      'busy_ms': busy * per_call,
      'span_ms': sum(stop - start for start, stop, _ in ops) * per_call,  # > busy_ms where ops overlap
      'by_kind': ordered(sums['kind']), 'by_phase': ordered(sums['phase']), 'by_layer': ordered(sums['layer']),
      'top': [[*part, ms, counts[part]] for part, ms in ordered(sums['part']).items()][:20],
      'lines': dict(collections.Counter(line_name(processes, threads, e) for _, _, e in ops)),
  }


def profile(call, compiled_text: str, *, calls: int, log_dir: str | None = None) -> dict:
  """breakdown() of `calls` calls of call() (each blocked until ready), traced into `log_dir` (kept) or a
  temporary directory; `compiled_text` is the program's compiled `as_text()`."""
  module, instructions = parse_hlo(compiled_text)
  with tempfile.TemporaryDirectory() as scratch:
    log_dir = log_dir or scratch
    with jax.profiler.trace(log_dir):
      start = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(call())
      wall_s = time.perf_counter() - start
    return breakdown(*trace_events(log_dir), module, instructions, calls=calls, wall_s=wall_s)


def format_breakdown(result: dict) -> str:
  """The breakdown as text: wall and busy time, then each grouping's ms per call and share of the busy time."""
  total = result['busy_ms'] or 1.0
  lines = [f"per call: wall {result['wall_ms']:.2f} ms, ops running {result['busy_ms']:.2f} ms, their spans summed "
           f"{result['span_ms']:.2f} ms (op events by trace line: "
           f"{', '.join(f'{name} {count}' for name, count in result['lines'].items())})"]
  for key in ('by_kind', 'by_phase', 'by_layer'):
    lines.append(f"{key[3:]:>6}: " + ', '.join(f'{name} {ms:.2f} ({100 * ms / total:.0f}%)'
                                               for name, ms in result[key].items()))
  lines.append('phase | layer | kind | ms | share | ops')
  lines += [f'{phase} | {layer} | {kind} | {ms:.2f} | {100 * ms / total:.1f}% | {count:.0f}'
            for phase, layer, kind, ms, count in result['top']]
  return '\n'.join(lines)
