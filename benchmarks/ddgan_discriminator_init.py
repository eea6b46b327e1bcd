"""How many updates a DDGAN discriminator needs, trained alone, to tell real pairs from the initial generator's.

  python benchmarks/ddgan_discriminator_init.py [--config configs/digits_ddgan.py] [--seeds 0,1,2]
      [--min_final_size 4] [--max_steps 1500] [--set gan.lr_d=1e-3 ...]

The generator stays at its initialisation (its output conv starts at ~1e-10, so x̂0 is a constant grey); the
discriminator takes the config's Adam (gan.lr_d with its cosine, beta1, beta2) and the config's R1 every
gan.lazy_reg updates, on batches of data.batch_size training images (with their labels, which G and D see when the
config is class-conditional), all at t = 0: the real pair is (x_0, x_1), the fake one (G's x̂0 from x_1, x_1) as
the train step builds them (the posterior at t = 0 is x̂0 itself).
`--min_final_size 1` is the reference's layout (the small discriminator halves 8 px down to 1x1); 4 is ddjax's
(ddjax.models.discriminator.halvings). `--set` overrides config keys (Python literals).

After every update, D is scored on held-out pairs: the test split's first 256 images and, for each, a fixed x_1
noise and z. Printed per seed (updates counted from 1):
  first       the first update after which D ranks the pairs: AUC ≥ 0.95, the share of (real, fake) held-out pairs
              whose real logit is the larger (an offset shared by both does not change it);
  separated   the update from which the AUC stays ≥ 0.95 at every later update up to --max_steps, or '>max_steps';
  sign ok     the share of updates from 50 on after which ≥ 95% of the 512 held-out logits have the right sign
              (> 0 real, < 0 fake: what the loss's sigmoid reads);
  gap         mean logit over real pairs − mean over fake ones, the median over updates from 50 on;
  spread      the standard deviation of D's logits over the 256 real pairs: at initialisation, and the smallest
              and the median over updates from 50 on (issue 35 asks for ≥ 0.1 through training).
"""
import argparse
import ast
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddjax import data, schedules
from ddjax.config import load_config_module
from ddjax.methods import ddgan
from ddjax.methods.base import optimizer_step
from ddjax.models import create_discriminator, create_model

HELDOUT = 256
SEPARATED = 0.95


def configured(path: str, settings: list[str], seed: int):
  config = load_config_module(path).get_config()
  for setting in settings:
    key, value = setting.split('=', 1)
    section, name = key.split('.')
    config[section][name] = ast.literal_eval(value)
  config.seed = seed
  return config


def measure(config, *, min_final_size: int, zero_init: bool, max_steps: int, trace: bool = False) -> dict:
  generator = create_model(config)
  discriminator = create_discriminator(config).clone(min_final_size=min_final_size, zero_init=zero_init)
  optimizers = ddgan.make_optimizers(config)
  state = ddgan.init_state_fn(config, generator, discriminator, optimizers)()
  g_params, d_params = state.params['generator'], state.params['discriminator']
  d_opt, d_opt_state = optimizers['discriminator'], state.opt_state['discriminator']
  schedule = schedules.make_schedule(ddgan.betas_of(config))
  gan = config.gan

  def labels_of(batch):
    """The batch's labels when the config is class-conditional, else None (what G and D take)."""
    return jnp.asarray(batch['label']) if config.data.num_classes else None

  def pairs(images, labels, key):
    """(real x_0, fake x̂0, x_1, t = 0) for each image, noise and z from `key`; G and D see the images' labels
    when the config is class-conditional."""
    noise_key, next_key, z_key = jax.random.split(key, 3)
    t = jnp.zeros((images.shape[0],), jnp.int32)
    x_t, x_next = ddgan.q_sample_pair(schedule, x0=images, t=t, noise=jax.random.normal(noise_key, images.shape),
                                      noise_next=jax.random.normal(next_key, images.shape))
    z = jax.random.normal(z_key, (images.shape[0], gan.nz))
    x0 = generator.apply({'params': g_params}, x_next, t, z, labels, train=True)
    fake = ddgan.posterior_sample(schedule, x0=x0, x_next=x_next, t=t, noise=jnp.zeros_like(x0))
    return x_t, fake, x_next, t

  def logits(d_params, x_prev, t, x_next, labels):
    return discriminator.apply({'params': d_params}, x_prev, t, x_next, labels, train=True)

  @jax.jit
  def d_step(d_params, d_opt_state, step, images, labels, key):
    x_t, fake, x_next, t = pairs(images, labels, key)
    loss_fn = lambda p: ddgan.discriminator_loss(logits(p, x_t, t, x_next, labels),
                                                 logits(p, fake, t, x_next, labels))
    grads = jax.grad(loss_fn)(d_params)
    r1 = lambda p: ddgan.r1_penalty(lambda x: logits(p, x, t, x_next, labels), x_t, r1_gamma=gan.r1_gamma)
    r1_grads = jax.lax.cond(step % gan.lazy_reg == 0, jax.grad(r1), lambda p: jax.tree.map(jnp.zeros_like, p),
                            d_params)
    grads = jax.tree.map(jnp.add, grads, r1_grads)
    return optimizer_step(d_opt, grads, d_opt_state, d_params)

  heldout_config = config.copy_and_resolve_references()
  heldout_config.data.batch_size = HELDOUT
  heldout = next(data.create_dataset(heldout_config, split='test'))
  heldout_labels = labels_of(heldout)
  x_t, fake, x_next, t = pairs(jnp.asarray(heldout['image']), heldout_labels, jax.random.key(10_000 + config.seed))

  @jax.jit
  def score(d_params):
    real = logits(d_params, x_t, t, x_next, heldout_labels)
    faked = logits(d_params, fake, t, x_next, heldout_labels)
    auc = jnp.mean(real[:, None] > faked[None, :])
    sign = (jnp.sum(real > 0) + jnp.sum(faked < 0)) / (2 * HELDOUT)
    return auc, sign, jnp.mean(real) - jnp.mean(faked), jnp.std(real)

  batches = data.create_dataset(config)
  key = jax.random.key(config.seed)
  spread_init = float(score(d_params)[3])
  history = []
  start = time.perf_counter()
  for step in range(max_steps):
    batch = next(batches)
    d_params, d_opt_state = d_step(d_params, d_opt_state, step, jnp.asarray(batch['image']), labels_of(batch),
                                   jax.random.fold_in(key, step))
    history.append(tuple(map(float, score(d_params))))
    if trace:
      print(f'  {step + 1:>5} auc {history[-1][0]:.3f} sign {history[-1][1]:.3f} gap {history[-1][2]:+.4f} '
            f'spread {history[-1][3]:.4f}', flush=True)
  auc, sign, gap, spread = np.array(history).T
  ranked = np.flatnonzero(auc >= SEPARATED)
  unranked = np.flatnonzero(auc < SEPARATED)
  late = slice(49, None)
  return {'first': int(ranked[0]) + 1 if len(ranked) else None,
          'separated': (int(unranked[-1]) + 2 if len(unranked) else 1) if auc[-1] >= SEPARATED else None,
          'sign_ok': float(np.mean(sign[late] >= SEPARATED)), 'gap': float(np.median(gap[late])),
          'spread_init': spread_init, 'spread_min': float(np.min(spread[late])),
          'spread_median': float(np.median(spread[late])), 'seconds': time.perf_counter() - start}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/digits_ddgan.py')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--min_final_size', type=int, default=4,
                      help='1: the reference layout; 4: ddjax\'s (ddjax.models.discriminator.MIN_FINAL_SIZE)')
  parser.add_argument('--init', choices=('zero', 'scale1'), default='zero',
                      help="zero: the reference's near-zero second and final convs; scale1: those at scale 1")
  parser.add_argument('--max_steps', type=int, default=1500)
  parser.add_argument('--trace', action='store_true', help='print every update\'s held-out scores')
  parser.add_argument('--set', nargs='*', default=[], help='config overrides, key=value (Python literals)')
  args = parser.parse_args(argv)
  print(f'{args.config} min_final_size={args.min_final_size} init={args.init} {" ".join(args.set)}')
  for seed in map(int, args.seeds.split(',')):
    r = measure(configured(args.config, args.set, seed), min_final_size=args.min_final_size,
                zero_init=args.init == 'zero',
                max_steps=args.max_steps, trace=args.trace)
    show = lambda step: f'{step:>5}' if step else f'>{args.max_steps}'
    print(f'seed {seed}: first {show(r["first"])}  separated {show(r["separated"])}  sign ok {r["sign_ok"]:.2f}  '
          f'gap {r["gap"]:+.3f}  spread init {r["spread_init"]:.1e}, min {r["spread_min"]:.4f}, median '
          f'{r["spread_median"]:.4f}  ({r["seconds"]:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
