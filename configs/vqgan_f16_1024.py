"""VQ-GAN configs. get_config("f16_1024"): LLM-CXR's image tokenizer (taming ImageNet f16/1024
architecture, 256 px, 16x16 = 256 codes). get_config("tiny"): the same shape family at 64 px for
tests and the demo.
"""
import ml_collections

VARIANTS = ("f16_1024", "tiny")


def get_config(variant=None):
    variant = variant or "f16_1024"
    if variant not in VARIANTS:
        raise ValueError(f"unknown VQ-GAN variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.name = variant
    m = c.model = ml_collections.ConfigDict()
    if variant == "f16_1024":
        m.resolution, m.ch, m.num_res_blocks = 256, 128, 2
        m.attn_resolutions = (16,)
        m.z_channels = m.embed_dim = 256
        m.n_embed = 1024
    else:
        m.resolution, m.ch, m.num_res_blocks = 64, 32, 1
        m.attn_resolutions = (4,)
        m.z_channels = m.embed_dim = 32
        m.n_embed = 64
    m.ch_mult = (1, 1, 2, 2, 4)
    m.in_channels = 3  # grayscale CXRs as RGB, as LLM-CXR; 1 is the efficient choice
    m.out_channels = 3
    m.beta = 0.25
    m.dropout = 0.0
    m.legacy_loss = True
    m.dtype = "float32"
    m.param_dtype = "float32"

    d = c.discriminator = ml_collections.ConfigDict()  # taming's PatchGAN
    d.input_channels = m.out_channels
    d.ndf = 64 if variant == "f16_1024" else 16
    d.n_layers = 3 if variant == "f16_1024" else 2
    d.dtype = m.dtype
    d.param_dtype = m.param_dtype

    t = c.train = ml_collections.ConfigDict()
    t.seed = 0
    t.data = "shapes"  # generated images until the CXR pipeline lands
    t.mesh = "-1,1,1"  # data parallel
    t.num_slices = 1  # TPU slices of a multi-slice job (launch/tpu_pod.py --num-slices)
    t.learning_rate = 4.5e-6  # LLM-CXR / taming (Adam, betas 0.5, 0.9)
    t.adam_b1 = 0.5
    t.adam_b2 = 0.9
    t.warmup_steps = 0
    t.codebook_weight = 1.0
    t.perceptual_weight = 1.0
    t.cip_weight = 100.0  # LLM-CXR's clinical-information-preserving loss
    t.disc_weight = 0.8
    t.disc_factor = 1.0
    t.disc_start = 0  # LLM-CXR fine-tunes a VQ-GAN whose discriminator is already on
    t.ema_decay = 0.0
    t.reseed_every = 0  # >0: every N steps, codes unused since the last reseed take encoder outputs
    # start of a fresh run (a resumed run ignores it): a taming / LLM-CXR .ckpt (generator, and the
    # discriminator when the file has it) or an orbax VQ-GAN directory. LLM-CXR: the ImageNet
    # f16/1024 VQ-GAN (`llmcxr import-vqgan`, or its .ckpt as is)
    t.init_from = ""
    t.lpips_weights = ""  # local file from `llmcxr convert-weights lpips`
    t.cip_weights = ""  # local file from `llmcxr convert-weights txv`
    t.batch_size = 8  # LLM-CXR: 2
    t.steps = 590_000
    t.log_every = 50
    t.eval_every = 5_000
    t.grid_images = 8
    t.checkpoint_every = 5_000
    t.keep_checkpoints = 3
    if variant == "tiny":  # runs locally: no perceptual nets, a larger step size, GAN late
        t.learning_rate = 5e-4
        t.reseed_every = 25
        t.perceptual_weight = 0.0
        t.cip_weight = 0.0
        t.disc_start = 250
        t.disc_weight = 0.1
        t.steps = 300
        t.log_every = 25
        t.eval_every = 100
        t.checkpoint_every = 100
    return c
