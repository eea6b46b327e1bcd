"""What every training method shares and supplies: the one TrainState, the `Method` interface the loop uses, and
the EMA and per-example randomness both methods' steps are built from."""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddjax import parallel


class TrainState(flax.struct.PyTreeNode):
  """Everything a checkpoint holds. The data position is `step` (the pipeline resumes from it).

  `params` and `opt_state` are a method's whole trainable state (for DDGAN dicts over 'generator' and
  'discriminator'); `ema_params` is the average of the network the sampler uses.
  """
  step: jnp.ndarray      # int32 number of updates done
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray       # uint32 key data (raw, so orbax stores it like any array)


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method supplies to the one loop (train.py), to `--mode sample` and to `--mode eval`; built from a
  config by `ddjax.methods.build`. The loop never asks which method it runs."""
  init_state: Callable[[], TrainState]     # builds the initial state (pure: run by initial_state, compiled)
  train_step: Callable                     # (state, batch, *, axis_name) -> (state, metrics): pure, one device
  sample_fn: Callable                      # (params, keys [B], labels [B], **values) -> float32 [B, H, W, C],
                                           # model space; values: sampler settings a method lets a sweep trace
  watched_metrics: tuple[str, ...]         # what the NaN guard checks before every log and save
  console_metrics: tuple[str, ...]         # what the console line shows
  learning_rates: Callable[[int], dict]    # {metric name: the rate update n (0-based) used}
  sampler: str                             # the sampler, in words, for logs
  parameter_counts: Callable[[Any], dict]  # params -> {network name: its parameter count}
  network_fn: Callable                     # (params, x_t, labels, rng) -> one call of the sampled network
  network_evals: int                       # network calls per sample (a guided step is one batched call)
  nll_fn: Callable | None = None           # (params, x0, labels, rng) -> bits/dim [B]; None: no likelihood
  ema_of: str | None = None                # the key of `params` holding the network the EMA averages (and the
                                           # sampler uses); None: `params` is that network

  def initial_state(self) -> TrainState:
    """The initial state, computed as one compiled program (run op by op, a network's init compiles hundreds of
    small programs) built with XLA's backend optimisations off: it runs once per run, and LLVM optimising a
    network's hundred random initialisers would dominate a CPU start-up. Every leaf is its own buffer
    (the EMA too): the step donates the state, and one buffer cannot be donated twice."""
    return self._compiled_init()

  @functools.cached_property
  def _compiled_init(self):
    """Compiled on first use and kept with the Method, so a second run with it compiles nothing."""
    return jax.jit(self.init_state).lower().compile(compiler_options=INIT_COMPILER_OPTIONS)

  def abstract_state(self) -> TrainState:
    """The TrainState's shapes and dtypes, computed without initialising anything: a restore template."""
    return jax.eval_shape(self.init_state)


INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def ema_decay_at(step, ema_decay: float):
  """EMA warm-up: min(decay, (1 + step) / (10 + step)), so early averages are not dominated by the init."""
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


@jax.named_scope('ema')  # ddjax.tools.profiling tells its ops apart by this scope
def ema_update(ema_params, params, *, step, ema_decay: float):
  """EMA ← d·EMA + (1 − d)·params with d = ema_decay_at(step)."""
  decay = ema_decay_at(step, ema_decay)
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


@jax.named_scope('optimizer')  # as ema_update's
def optimizer_step(tx, grads, opt_state, params):
  """(new params, new optimizer state): one update of the optax transformation `tx`."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def example_keys(state: TrainState, local_batch: int, axis_name):
  """(a key per example of this device's shard, a key for this device) from (state rng, step): example keys are
  folded from the GLOBAL example index, so what an example draws does not depend on how the batch is split over
  devices; the device key (for dropout) does."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  example_root, device_root = jax.random.split(step_key)
  first_example = parallel.device_index(axis_name) * local_batch
  keys = jax.vmap(lambda i: jax.random.fold_in(example_root, i))(first_example + jnp.arange(local_batch))
  return keys, jax.random.fold_in(device_root, parallel.device_index(axis_name))


def cross_device_mean(axis_name):
  """pmean over the data axis, or the identity outside a mapped function and over one device (where XLA would
  still copy every gradient through an all-reduce)."""
  if not axis_name or jax.lax.axis_size(axis_name) == 1:
    return lambda x: x
  return lambda x: jax.lax.pmean(x, axis_name)


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
