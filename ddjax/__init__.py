"""ddjax: diffusion image models (DDPM, IDDPM, DDIM, CFG, v-prediction, DDGAN) in JAX/Flax."""
