"""The embedded default: class-conditional IDDPM + classifier-free guidance on the bundled 8x8 digits.

Cosine schedule, learned-range variance, hybrid loss (IDDPM), label dropout for CFG. Trains offline on a
2-core CPU in minutes and samples with guidance by 20 ancestral steps (learned variance) on the trailing grid: of
DDPM, DDIM and DPM-Solver++ at 5-50 steps on the three grids, the sampler that scored best per network evaluation
on this model (docs/samplers.md).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = 'diffusion'  # the training method (ddjax.methods): 'diffusion' or 'ddgan'
  config.weights = config_dict.placeholder(str)  # --mode import: a published checkpoint (ddjax.pretrained)

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'digits'
  data.data_dir = config_dict.placeholder(str)
  data.image_size = 8
  data.num_channels = 1
  data.num_classes = 10
  data.batch_size = 128  # global batch, split over every device of every host
  data.random_flip = False  # digits are not mirror-symmetric
  data.shuffle_buffer = 4096
  data.num_shards = 0  # 0: one data shard per process; fixed N: the same data order on any host count dividing N

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.schedule = 'cosine'
  diffusion.prediction = 'eps'
  diffusion.variance = 'learned_range'
  diffusion.loss = 'hybrid'
  diffusion.hybrid_lambda = 0.001

  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'
  model.ch = 64
  model.ch_mult = 1  # channels at level l: ch * 2**(ch_mult * l)
  model.num_levels = 2
  model.blocks = 'res,clsAtn,chnAtn'
  model.attn_resolution = 4
  model.num_heads = 4
  model.dropout = 0.0
  model.t_dim = 128
  model.c_dim = 128
  model.remat = False  # rematerialise every block's activations in the backward pass (less memory, ~1/3 more compute)

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 1500
  train.learning_rate = 1e-3
  train.warmup_steps = 200
  train.weight_decay = 0.0
  train.grad_clip = 1.0
  train.grad_accum_steps = 1  # micro-batches per device batch (the seed's gradAccSteps)
  train.ema_decay = 0.999
  train.p_uncond = 0.2
  train.log_every = 100
  train.checkpoint_every = 500
  train.sample_every = 500
  train.keep_checkpoints = 3

  config.sample = sample = ml_collections.ConfigDict()
  sample.sampler = 'ddpm'  # 'ddpm' (ancestral), 'ddim' (with eta or ddim_scale), 'dpm++2m' (DPM-Solver++(2M))
  sample.num_steps = config_dict.FieldReference(20, field_type=int)
  sample.spacing = 'trailing'  # the grid of num_steps: 'even' (IDDPM's), 'leading' (DDIM's), 'trailing' (T-1 first)
  sample.step_size = config_dict.placeholder(int)  # when set, used instead of num_steps (the seed's knob)
  sample.eta = 0.0
  sample.ddim_scale = config_dict.placeholder(float)
  sample.guidance = 1.0
  sample.class_label = -1  # -1: random classes; a grid cycles 0..num_classes-1 per row
  sample.num_samples = 100
  sample.batch_size = 100
  sample.clip_x0 = True
  sample.checkpoint_step = config_dict.placeholder(int)

  # --mode sweep: every sampler × steps × guidance × (η, then ddim_scale) cell, as comma lists (config.sweep_grid).
  config.sweep = sweep = ml_collections.ConfigDict()
  sweep.sampler = 'ddim'  # any of 'ddim', 'ddpm', 'dpm++2m'
  sweep.num_steps = '5,10,20,50,100,250,1000'
  sweep.spacing = 'trailing'  # the grids of num_steps, any of 'even', 'leading', 'trailing'
  sweep.step_size = ''  # the seed's strides, e.g. '10,20': cells besides those of num_steps
  sweep.eta = '0,0.5,1'
  sweep.ddim_scale = ''  # the seed's s, e.g. '0,0.5,1': cells besides those of eta (DDIM only)
  sweep.guidance = '1'
  sweep.num_samples = 1000  # per cell, the same seeds and labels in every cell

  config.parallel = parallel = ml_collections.ConfigDict()
  parallel.mode = 'shard_map'
  parallel.precision = 'float32'

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_samples = 1000
  evaluation.metrics = 'auto'  # 'inception' (FID/IS), 'offline' (a classifier trained on the data), 'both', 'auto'
  evaluation.inception_weights = config_dict.placeholder(str)
  evaluation.reference = 'train'  # a split of data.dataset ('train'|'validation'|'test') or a stats .npz path
  evaluation.batch_size = 200  # Inception batch (global, split over devices)
  evaluation.bpd_examples = 256  # held-out examples for the NLL in bits/dim (0 = skip)
  evaluation.cache_dir = config_dict.placeholder(str)  # reference statistics cache (None: ~/.cache/ddjax)
  return config
