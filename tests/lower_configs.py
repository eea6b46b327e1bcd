"""Lowers one train step of each config file given, at its real shapes, on the devices this process sees:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.lower_configs configs/a.py configs/b.py

Nothing runs and nothing is compiled: the state and batch are ShapeDtypeStructs. Prints one JSON line per config
(its name, the device count, the per-device batch shape found in the lowered program, the parameter count).
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ddjax import config as config_lib, methods, parallel


def lower_train_step(config):
  """(the lowered train step of `config` over every device, the abstract state)."""
  config_lib.validate(config)
  method = methods.build(config)
  mapper = parallel.DataParallel.create(config.parallel.mode)
  step_fn = mapper.map(method.train_step)
  replicated = NamedSharding(mapper.mesh, PartitionSpec())
  sharded = NamedSharding(mapper.mesh, PartitionSpec(parallel.AXIS))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       method.abstract_state())
  data, batch_size = config.data, config.data.batch_size
  batch = {'image': jax.ShapeDtypeStruct((batch_size, data.image_size, data.image_size, data.num_channels),
                                         jnp.float32, sharding=sharded),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded)}
  return step_fn.lower(state, batch), state


def main(paths):
  for path in paths:
    config = config_lib.load_config_module(path).get_config()
    lowered, state = lower_train_step(config)
    data = config.data
    per_device = (data.batch_size // jax.device_count(), data.image_size, data.image_size, data.num_channels)
    text = lowered.as_text()
    print(json.dumps({'config': path, 'devices': jax.device_count(), 'mode': config.parallel.mode,
                      'per_device_batch': list(per_device),
                      'per_device_batch_in_program': f'tensor<{"x".join(map(str, per_device))}xf32>' in text,
                      'params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))}), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
