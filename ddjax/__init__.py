"""ddjax: diffusion image models (DDPM, IDDPM, DDIM, CFG, v-prediction, DDGAN) in JAX/Flax."""
import os

# XLA flags ddjax sets unless the user set them in XLA_FLAGS (both exist in jaxlib 0.10–0.12). XLA reads them
# when the first backend starts, so importing ddjax before using JAX is enough; each backend reads only its own.
DEFAULT_XLA_FLAGS = {
    # XLA:CPU hands each convolution to YNNPACK by default ('individual_convolution' among its library fusions),
    # whose kernels run a 3×3 convolution's forward at about half and its weight gradient at about a quarter of
    # the rate of XLA's own Eigen ones: dots and reductions stay on YNNPACK, convolutions go to Eigen (the
    # matched U-Net's train step 2.8 → 1.6 s, the FID network 8.8 → 17.8 images/s; README, Performance).
    'xla_cpu_experimental_ynn_fusion_type': 'individual_dot,reduce',
    # GPU: let the scheduler overlap the data-parallel gradient all-reduce with the rest of the backward pass
    # (NVIDIA's JAX containers set it for the same reason); it changes nothing on one device.
    'xla_gpu_enable_latency_hiding_scheduler': 'true',
}
_user_flags = os.environ.get('XLA_FLAGS', '')
os.environ['XLA_FLAGS'] = ' '.join([_user_flags] + [f'--{name}={value}' for name, value in DEFAULT_XLA_FLAGS.items()
                                                   if name not in _user_flags]).strip()
