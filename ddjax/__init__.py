"""ddjax: diffusion image models (DDPM, IDDPM, DDIM, CFG, v-prediction, DDGAN) in JAX/Flax.

Importing it changes no environment variable and no JAX setting; the entry points set their XLA flags
(ddjax.xla_flags).
"""
