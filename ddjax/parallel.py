"""Data parallelism, in one place: the device mesh, batch placement, and the `pmap` / `shard_map` step wrappers.

The model and the math know nothing about devices. A step function is written once for one device's shard of
the batch, with `axis_name` naming the data axis for its collectives (`lax.pmean`, `lax.axis_index`); this module
maps it over every device of every host. The train state is replicated; the global batch is split over devices.
"""
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddjax.validation import check, check_choice

MODES = ('pmap', 'shard_map')
AXIS = 'data'


def validate(config, device_count: int | None = None):
  """Parallel settings against `device_count` devices (default: those this program sees, across hosts)."""
  check_choice('parallel.mode', config.parallel.mode, MODES)
  check_choice('parallel.precision', config.parallel.precision, ('float32', 'bfloat16'))
  devices = device_count or jax.device_count()
  check(config.data.batch_size % devices == 0, 'data.batch_size', config.data.batch_size,
        f'a multiple of the global device count {devices}')
  accum = config.train.grad_accum_steps
  check(accum >= 1 and (config.data.batch_size // devices) % accum == 0, 'train.grad_accum_steps', accum,
        f'>= 1 and a divisor of the per-device batch {config.data.batch_size // devices}')


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

  @property
  def _pmap_sharding(self) -> NamedSharding:
    """pmap's layout: the leading axis split over this host's devices."""
    return NamedSharding(Mesh(np.asarray(jax.local_devices()), (AXIS,)), PartitionSpec(AXIS))

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
    """Host tree -> the replicated layout `map`'s first argument expects, in fresh buffers (`map` donates it)."""
    if self.mode == 'pmap':  # a leading axis of local devices, one slice on each
      return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (self.local_device_count,)
                                                                   + np.shape(x)), self._pmap_sharding), tree)
    return global_replicated(self.mesh, tree)

  def unreplicate(self, tree):
    """Replicated layout -> one host (numpy) copy: what gets checkpointed, logged, or sampled with. Reads this
    process's first device only, so it works when the arrays span several hosts."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

  def shard_batch(self, host_batch):
    """This host's numpy batch (leading axis = host batch) -> the layout `map`'s second argument expects."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: jax.device_put(x.reshape((self.local_device_count, -1) + x.shape[1:]),
                                                   self._pmap_sharding), host_batch)
    sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


# -- sampling and evaluation: plain jit over global arrays on the same mesh ----------------------------------

def global_replicated(mesh: Mesh, tree):
  """A tree (identical on every process) as global arrays replicated on every device, copied via the host so
  the result never aliases the input."""
  return jax.device_put(jax.device_get(tree), NamedSharding(mesh, PartitionSpec()))


def global_sharded(mesh: Mesh, array: np.ndarray):
  """A host array (identical on every process) as a global array split along its leading axis."""
  sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fetch(array) -> np.ndarray:
  """A global array, whole, as numpy on every process."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def prefetch(batches, place, size: int = 2):
  """Yields place(batch) while the next `size` batches are already being copied to the devices (device_put is
  asynchronous, so placing ahead overlaps the copy with the running step)."""
  queue = collections.deque()
  for batch in batches:
    queue.append(place(batch))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def device_index(axis_name):
  """Index of this device along the data axis (0 when not mapped)."""
  return jax.lax.axis_index(axis_name) if axis_name else jnp.int32(0)
