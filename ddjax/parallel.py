"""Data parallelism, in one place: the device mesh, batch placement, and the `pmap` / `shard_map` step wrappers.

The model and the math know nothing about devices. A step function is written once for one device's shard of
the batch, with `axis_name` naming the data axis for its collectives (`lax.pmean`, `lax.axis_index`); this module
maps it over every device of every host. The train state is replicated; the global batch is split over devices.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddjax.validation import check, check_choice

MODES = ('pmap', 'shard_map')
AXIS = 'data'


def validate(config):
  """Parallel settings against the devices this program sees (global count across hosts)."""
  check_choice('parallel.mode', config.parallel.mode, MODES)
  check_choice('parallel.precision', config.parallel.precision, ('float32', 'bfloat16'))
  devices = jax.device_count()
  check(config.data.batch_size % devices == 0, 'data.batch_size', config.data.batch_size,
        f'a multiple of the global device count {devices}')


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """Maps per-device functions over all devices in `mode` ('pmap' or 'shard_map')."""
  mode: str
  mesh: Mesh

  @classmethod
  def create(cls, mode: str) -> 'DataParallel':
    check_choice('parallel.mode', mode, MODES)
    return cls(mode, Mesh(np.asarray(jax.devices()), (AXIS,)))

  @property
  def local_device_count(self) -> int:
    return jax.local_device_count()

  def map(self, fn, *, donate_state: bool = True):
    """fn(replicated, sharded, *, axis_name) -> (replicated outputs) compiled over all devices.

    `replicated` (e.g. the train state) is the same on every device; `sharded` (e.g. the batch) is split along
    its leading axis. Outputs must be device-invariant (pmean'd by fn).
    """
    def per_device(replicated, sharded):
      return fn(replicated, sharded, axis_name=AXIS)

    donate = (0,) if donate_state else ()
    if self.mode == 'pmap':
      return jax.pmap(per_device, axis_name=AXIS, donate_argnums=donate)
    replicated, sharded = PartitionSpec(), PartitionSpec(AXIS)
    mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=(replicated, sharded), out_specs=replicated,
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)

  # -- placement ---------------------------------------------------------------------------------------------

  def replicate(self, tree):
    """Host tree -> the replicated layout `map`'s first argument expects."""
    if self.mode == 'pmap':  # a leading axis of local devices; pmap places one slice on each
      return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.local_device_count,) + np.shape(x)), tree)
    return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

  def unreplicate(self, tree):
    """Replicated layout -> one copy (what gets checkpointed, logged, or sampled with)."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: x[0], tree)
    return tree

  def shard_batch(self, host_batch):
    """This host's numpy batch (leading axis = host batch) -> the layout `map`'s second argument expects."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: x.reshape((self.local_device_count, -1) + x.shape[1:]), host_batch)
    sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


def device_index(axis_name):
  """Index of this device along the data axis (0 when not mapped)."""
  return jax.lax.axis_index(axis_name) if axis_name else jnp.int32(0)
