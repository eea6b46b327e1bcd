"""Denoising Diffusion GAN on the bundled 8x8 digits: unconditional as the paper's models, T = 4 denoising steps,
a small NCSN++ generator (AdaGN) and the small time-conditioned discriminator. Trains offline on a 2-core CPU in
minutes and samples with 4 generator calls per image. `--config.data.num_classes=10` makes G and D
class-conditional (G: a class embedding in the mapping network; D: a projection term).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.method = 'ddgan'

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'digits'
  data.data_dir = config_dict.placeholder(str)
  data.image_size = 8
  data.num_channels = 1
  data.num_classes = 0  # unconditional, as the paper's models
  data.batch_size = 64  # global batch, split over every device of every host
  data.random_flip = False
  data.shuffle_buffer = 4096
  data.num_shards = 0

  config.gan = gan = ml_collections.ConfigDict()
  gan.num_timesteps = 4
  gan.use_geometric = False  # the VP discretisation
  gan.beta_min = 0.1
  gan.beta_max = 20.0
  gan.nz = 16
  gan.z_emb_dim = 64
  gan.n_mlp = 2
  gan.discriminator = 'small'
  gan.d_ch = 8  # the discriminator's ngf
  # R1 at 50x the paper's CIFAR-10 value, for a D that learns 40x faster than G (below): at 9,000 steps five runs
  # at 1.0 scored FD 10.3-16.4 (recall 0.86-0.93), four at 0.05 scored 8.7-20.7 (recall 0.76-0.86) (README).
  gan.r1_gamma = 1.0
  gan.lazy_reg = 15
  # D 40x faster than G: with G at 3e-4 or more, G undoes each direction D finds and D's logits lose their spread
  # over inputs within 100-300 steps; against G at 1e-4, FD at 6,000 steps was 33 at lr_d 1e-3, 18 at 2e-3, 11 to
  # 29 in three runs at 4e-3; at 8e-3 D diverges early (FD 118) (README).
  gan.lr_g = 1e-4
  gan.lr_d = 4e-3
  gan.beta1 = 0.5
  gan.beta2 = 0.9
  gan.lr_decay_steps = 9000  # the cosine to 1e-5 over this many updates (0 = constant): train.num_steps here

  config.model = model = ml_collections.ConfigDict()
  model.name = 'ncsnpp'
  model.ch = 16  # nf
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = ()
  model.dropout = 0.0
  model.not_use_tanh = False
  model.remat = False

  config.train = train = ml_collections.ConfigDict()
  # Samples improve while the cosine lowers the rates: three 6,000-step runs scored FD 11-29 (confident share
  # 0.65-0.73), nine runs of 9,000 steps 8.7-20.7 (0.75-0.78); 11:43-14:40 wall on idle 2-core CPUs (README).
  train.num_steps = 9000
  train.grad_accum_steps = 1
  train.ema_decay = 0.999
  train.log_every = 250
  train.checkpoint_every = 1000
  train.sample_every = 1000
  train.keep_checkpoints = 3

  config.sample = sample = ml_collections.ConfigDict()
  sample.class_label = -1
  sample.num_samples = 100
  sample.batch_size = 100
  sample.checkpoint_step = config_dict.placeholder(int)

  config.parallel = parallel = ml_collections.ConfigDict()
  parallel.mode = 'shard_map'
  parallel.precision = 'float32'

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_samples = 1000
  evaluation.metrics = 'auto'  # 'inception' (FID/IS), 'offline' (a classifier trained on the data), 'both', 'auto'
  evaluation.inception_weights = config_dict.placeholder(str)
  evaluation.reference = 'train'
  evaluation.batch_size = 200
  evaluation.bpd_examples = 0  # a GAN has no likelihood
  evaluation.cache_dir = config_dict.placeholder(str)
  return config
