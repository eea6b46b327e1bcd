"""ddjax: diffusion image models (DDPM, IDDPM, DDIM, CFG, v-prediction, DDGAN) in JAX/Flax."""
import os

# XLA:CPU hands each convolution to YNNPACK by default ('individual_convolution' among the library fusions, jaxlib
# 0.10–0.12), whose kernels run a 3×3 convolution's forward at about half and its weight gradient at about a
# fifth of the rate of XLA's own Eigen ones (benchmarks: 2.8 → 1.6 s per U-Net train step). Keep YNNPACK for
# what it does well (dots, reductions) and convolutions on Eigen, unless the user chose. Read when the first
# backend starts, so importing ddjax before using JAX is enough; only the CPU backend reads it.
CPU_LIBRARY_FUSIONS = '--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce'
if 'xla_cpu_experimental_ynn_fusion_type' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {CPU_LIBRARY_FUSIONS}'.strip()
