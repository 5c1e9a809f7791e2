"""LLM-CXR stage 1 instruction tuning (REFERENCE.md recipe): every train-split image, report text =
findings + impression, task mix CXR->report 0.3 / report->CXR 0.3 / VQA 0.2 / text 0.2, AdamW
lr 5e-6 with 50 warmup steps then constant, global batch 16, 2048 tokens, bf16 compute.

Variants: tiny (CPU tests and the demo), 3b (dolly-v2-3b, the paper's), 7b (pythia-6.9b),
12b (pythia-12b). `llmcxr train --config configs/llmcxr_stage1.py:3b --workdir DIR
--config.data.root=MIMIC --config.data.codes=CODES --config.train.init_from=HF_DIR`.
Each with "_original" (e.g. 3b_original) trains on LLM-CXR's own data recipe instead of ours: one
direction per image by index parity, MIMIC 0.8 / Dolly 0.2 by pool size, padded rows of one example,
16 per step, and its shipped selection lists read from ROOT (see ORIGINAL_DATA).
"""
import ml_collections

from llmcxr_jax.configs import load_sibling

SIZES = ("tiny", "3b", "7b", "12b")
VARIANTS = SIZES + tuple(f"{size}_original" for size in SIZES)
# LLM-CXR's recipe (training/trainer.py, training/mimiccxr_vq_dataset.py), set by the "_original" variants
ORIGINAL_DATA = {
    "directions": "parity",  # one task per image: even index CXR->report, odd report->CXR
    "mix": "original",  # interleave_datasets([MIMIC tasks concatenated, Dolly], [0.8, 0.2], all_exhausted)
    "packing": False,  # padded rows, one example each
    # its shipped lists, copied into the MIMIC root as its own layout keeps the first one
    "stage2_list": "{data.root}/mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle",
    "eval_list": "{data.root}/eval_dicom_ids.pickle",
}
ORIGINAL_BATCH = 16  # examples per optimizer step: 2 per GPU x 8 GPUs
MODEL = {"tiny": "tiny", "3b": "dolly-v2-3b", "7b": "pythia-6.9b", "12b": "pythia-12b"}
# data, fsdp, tensor: FSDP over every chip (ZeRO-3 as LLM-CXR); tensor parallelism for 12b
MESH = {"tiny": "1,-1,1", "3b": "1,-1,1", "7b": "1,-1,1", "12b": "1,-1,2"}
STAGE1_STEPS = 76_000  # paper: 76k steps (5 epochs in the original script)


def get_config(variant=None, stage: int = 1):
    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    size, _, recipe = variant.partition("_")
    c = ml_collections.ConfigDict()
    c.name = f"llmcxr_stage{stage}_{variant}"
    c.model = load_sibling(__file__, "gpt_neox.py", MODEL[size])

    d = c.data = ml_collections.ConfigDict()
    d.stage = stage
    d.root = ""  # MIMIC-CXR-JPG layout root (real, or `llmcxr synth`)
    d.reports_root = ""  # unzipped mimic-cxr-reports root; default ROOT/reports
    d.codes = ""  # `llmcxr encode-images` output, or `llmcxr import-codes` of LLM-CXR's pickle
    d.tokenizer = ""  # HF tokenizer directory; default: the one of train.init_from
    d.dolly = ""  # databricks-dolly-15k.jsonl; default ROOT/databricks-dolly-15k.jsonl
    d.dolly_eval_rows = 200  # held out for eval loss (LLM-CXR's test_size)
    d.views = "all"  # stage-1 images: "all" views (LLM-CXR) or "frontal" (PA/AP, what stage 2 and evaluation use)
    d.seq_len = 2048
    d.max_length = 2048
    d.packing = True
    d.max_examples_per_row = 16
    d.loss = "response"  # or "joint": the paper's ablation
    d.image_delimiters = "text"  # "<" codes ">" as LLM-CXR; "special" = dedicated tokens
    d.mixture = ml_collections.ConfigDict({"cxr_to_report": 0.3, "report_to_cxr": 0.3, "vqa": 0.2, "text": 0.2})
    # "fixed": the mixture above; "original": LLM-CXR's MIMIC 0.8 (split over the MIMIC tasks by pool size) /
    # Dolly 0.2 interleave over the tasks the mixture keeps (weight > 0)
    d.mix = "fixed"
    d.directions = "both"  # each image as CXR->report and report->CXR; "parity": one of them (LLM-CXR)
    # LLM-CXR's shipped id lists instead of rebuilding them ("{data.root}" = data.root): the earliest PA/AP
    # selection pickle (stage 2, VQA and evaluation images) and eval_dicom_ids.pickle (evaluation images)
    d.stage2_list = ""
    d.eval_list = ""
    d.epoch_size = 0
    d.seed = 42
    d.num_shards = 0  # logical data shards (0: one per process); fix it to make runs host-count independent
    d.num_workers = 0
    d.num_threads = 4
    # CXR->report / report->CXR instructions: a file (one per line, or a JSON list of strings) or the folder
    # `llmcxr extract-instructions` writes (LLM-CXR's own lists); "" = our ten paraphrases each (data/prompts.py)
    d.report_instructions = ""
    d.image_instructions = ""

    t = c.train = ml_collections.ConfigDict()
    t.seed = 0
    t.mesh = MESH[size]
    # TPU slices of a multi-slice job (launch/tpu_pod.py --num-slices): the data axis of train.mesh spans them
    t.num_slices = 1
    t.batch_size = 16  # global rows per step (LLM-CXR: 2 per GPU x 8)
    t.grad_accum = 1  # micro-batches per step (batch_size / grad_accum rows each)
    t.logits_chunk = 0 if size == "tiny" else 512  # LM-head logits this many positions at a time; 0: whole rows
    t.steps = STAGE1_STEPS if stage == 1 else 9_000
    t.learning_rate = 5e-6
    t.warmup_steps = 50
    t.schedule = "constant"  # DeepSpeed WarmupLR as LLM-CXR; or cosine / linear
    t.final_lr_ratio = 0.0
    t.adam_b1 = 0.9
    t.adam_b2 = 0.999
    t.adam_eps = 1e-8
    t.weight_decay = 0.0
    t.grad_clip = 1.0
    t.freeze = ""  # regex over parameter paths, e.g. "layers/(0|1)/"
    t.image_rows_only = False  # train only the image-token rows of the tables (warm start)
    t.init_from = ""  # HF GPT-NeoX directory or orbax LM checkpoint (stage 2: stage 1's workdir)
    t.resume_from = ""  # another run's workdir to continue (state and data position)
    t.new_rows = "normal"  # image-row init when importing HF weights
    t.log_every = 50
    t.eval_every = 1500
    t.eval_batches = 8
    # At each eval step, sampled reports for the first `samples` held-out images and CXRs drawn from their
    # reports, logged to TensorBoard; needs the VQ-GAN the codes came from (its directory). "": none.
    t.samples = 4
    t.samples_vqgan = ""
    t.checkpoint_every = 1000
    t.keep_checkpoints = 5
    t.peak_flops = 0.0  # per device, for MFU; 0 = from the device table when known
    # "A:B": a jax.profiler trace of steps A..B-1 (B excluded; step numbers as in metrics.jsonl) in WORKDIR/profile,
    # from process 0; "" = no trace
    t.profile_steps = ""

    if size == "tiny":
        c.model.scan_layers = False
        c.model.dtype = "float32"
        d.seq_len = d.max_length = 512
        d.max_examples_per_row = 8
        t.batch_size = 8
        t.steps = 60
        t.learning_rate = 3e-3
        t.warmup_steps = 5
        t.log_every = 5
        t.eval_every = 30
        t.eval_batches = 2
        t.checkpoint_every = 30
        t.keep_checkpoints = 2
    if recipe == "original":
        d.update(ORIGINAL_DATA)
        t.batch_size = ORIGINAL_BATCH
    return c
