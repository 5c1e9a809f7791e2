"""`llmcxr demo`: the whole LLM-CXR loop at laptop size on a synthetic CXR corpus.

get_config("full") (the default): 8-9 minutes on 2 CPU cores, as fast as the machine (the README
has one run's numbers: in that budget the LM's reports name cardiomegaly, effusion and pneumothorax
well above chance and support devices about at chance, and the classifier finds each of the four in
its drawings above chance, AUROC 0.55-0.79 over three training seeds, docs/demo.md).
get_config("quick"): every phase at toy size in a few minutes (CI runs it).

Sections: corpus (llmcxr synth), vqgan / stage1 / stage2 (complete train configs; the demo fills
in the data paths), tokenizer, classifier (the synthetic-corpus CNN scoring report->CXR images),
evaluate (llmcxr evaluate options) and pytorch (the transformers reload check).
Differences from the paper's recipe, all for a CPU: 64 px images and an f8 VQ-GAN (8 x 8 = 64
codes per image from a 512-entry codebook; the paper: 256 px, f16, 16 x 16 codes of 1024), a
GPT-NeoX of a few million parameters trained from scratch with a large step size and small
batches, a task mixture that favours the image tasks, and stage 1 on frontal images only
(LLM-CXR trains stage 1 on every view; here laterals took a third of the steps, and dropping
them took held-out image-token loss from 2.75 to 2.55 and device F1 from 0.17 to 0.39).
Evaluation samples reports at temperature 0.5 and drawings at 0.8 (LLM-CXR: 1.0 for both). On one
model, averaged over four sampling seeds, drawings at 0.8 against 0.5 scored (classifier AUROC)
cardiomegaly 0.62 / 0.61, effusion 0.67 / 0.67, pneumothorax 0.62 / 0.56, devices 0.69 / 0.74;
at 1.0 (three seeds) 0.58 / 0.58 / 0.59 / 0.64. Reports sampled above 0.5 name fewer findings.
Why f8: at f4 (16 x 16 = 256 codes) the VQ-GAN keeps more (a classifier on its
reconstructions: pneumothorax AUROC 0.98 against 0.76 at f8 on films whose rim was ~2 px), but
each image example costs the LM four times the tokens, and in the same 20 minutes it learned
neither direction. The synthetic films now keep small
findings wide enough for f8 codes (pneumothorax 0.98, devices 0.84 on reconstructions).
"""
import ml_collections

from llmcxr_jax.configs import load_sibling

VARIANTS = ("full", "quick")


def _vqgan(quick: bool) -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "vqgan_f16_1024.py", "tiny")
    m, t = c.model, c.train
    m.ch_mult = (1, 2, 2, 4)  # f8: 64 px -> 8 x 8 codes
    m.attn_resolutions = (8,)
    m.n_embed = 512
    t.steps = 4 if quick else 200
    t.batch_size = 4  # twice the updates of batch 8 in the same time
    t.learning_rate = 1e-3
    t.reseed_every = 10  # unused codes take encoder outputs often: ~120 of 512 in use after 200 steps
    t.disc_factor = 0.0  # no GAN in a short run (it only adds noise before convergence); the step skips it
    t.eval_every = t.checkpoint_every = 4 if quick else 100
    t.log_every = 2 if quick else 50
    t.grid_images = 4
    if quick:  # 32 px, f4 (still 8 x 8 codes), no attention: quicker to compile and run
        m.resolution, m.ch_mult, m.attn_resolutions, m.n_embed = 32, (1, 2, 2), (), 128
        c.discriminator.n_layers = 1
    return c


def _lm(stage: int, quick: bool) -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "llmcxr_stage1.py", "tiny", stage=stage)
    m, d, t = c.model, c.data, c.train
    m.image_codes = 128 if quick else 512
    if not quick:
        m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size = 128, 2, 4, 512
    d.seq_len = d.max_length = 512
    d.views = "frontal"  # stage 1 on PA/AP only: evaluation is frontal, and laterals cost a third of the steps
    d.dolly_eval_rows = 20
    d.num_shards = 1
    d.mixture = ml_collections.ConfigDict({"cxr_to_report": 0.45, "report_to_cxr": 0.35, "vqa": 0.1, "text": 0.1})
    t.batch_size = 4  # small batches, more steps: more learning per CPU second
    t.learning_rate = 3e-3
    t.weight_decay = 0.1  # the LM overfits the corpus (train 1.1 vs held-out 1.7 without it)
    t.warmup_steps = 10
    t.schedule = "cosine"
    t.final_lr_ratio = 0.1
    steps = (6 if stage == 1 else 4) if quick else (2000 if stage == 1 else 200)
    t.steps = steps
    t.log_every = max(1, steps // 10)
    t.eval_every = t.checkpoint_every = steps // 2
    t.eval_batches = 2
    return c


def get_config(variant=None):
    variant = variant or "full"
    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r}; choose one of {VARIANTS}")
    quick = variant == "quick"
    c = ml_collections.ConfigDict()
    c.name = f"demo_{variant}"
    c.seed = 0
    c.corpus = ml_collections.ConfigDict({"num_images": 160 if quick else 4000, "image_size": 32 if quick else 64})
    c.vqgan = _vqgan(quick)
    c.encode_batch_size = 32
    c.tokenizer = ml_collections.ConfigDict({"vocab_size": 1024 if quick else 2048})
    c.classifier = ml_collections.ConfigDict({"steps": 10 if quick else 400, "batch": 32, "lr": 2e-3,
                                              "widths": (8, 8) if quick else (16, 32, 64, 64),
                                              "hidden": 16 if quick else 64})
    c.stage1 = _lm(1, quick)
    c.stage2 = _lm(2, quick)
    c.evaluate = ml_collections.ConfigDict({"max_images": 8 if quick else 0, "max_vqa": 8 if quick else 300,
                                            "batch_size": 32, "greedy": False, "temperature": 0.5,
                                            "image_temperature": 0.8,
                                            "max_new_tokens": 24 if quick else 96,
                                            "grid_images": 4 if quick else 8})
    c.pytorch = ml_collections.ConfigDict({"max_new_tokens": 16 if quick else 64})
    return c
