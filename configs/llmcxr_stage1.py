"""LLM-CXR stage 1 instruction tuning (REFERENCE.md recipe): every train-split image, report text =
findings + impression, task mix CXR->report 0.3 / report->CXR 0.3 / VQA 0.2 / text 0.2, AdamW
lr 5e-6 with 50 warmup steps then constant, global batch 16, 2048 tokens, bf16 compute.

Variants: tiny (CPU tests and the demo), 3b (dolly-v2-3b, the paper's), 7b (pythia-6.9b),
12b (pythia-12b). `llmcxr train --config configs/llmcxr_stage1.py:3b --workdir DIR
--config.data.root=MIMIC --config.data.codes=CODES --config.train.init_from=HF_DIR`.
"""
import ml_collections

from llmcxr_jax.configs import load_sibling

VARIANTS = ("tiny", "3b", "7b", "12b")
MODEL = {"tiny": "tiny", "3b": "dolly-v2-3b", "7b": "pythia-6.9b", "12b": "pythia-12b"}
# data, fsdp, tensor: FSDP over every chip (ZeRO-3 as LLM-CXR); tensor parallelism for 12b
MESH = {"tiny": "1,-1,1", "3b": "1,-1,1", "7b": "1,-1,1", "12b": "1,-1,2"}
STAGE1_STEPS = 76_000  # paper: 76k steps (5 epochs in the original script)


def get_config(variant=None, stage: int = 1):
    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.name = f"llmcxr_stage{stage}_{variant}"
    c.model = load_sibling(__file__, "gpt_neox.py", MODEL[variant])

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
    d.epoch_size = 0
    d.seed = 42
    d.num_shards = 0  # logical data shards (0: one per process); fix it to make runs host-count independent
    d.num_workers = 0
    d.num_threads = 4
    d.report_instructions = ""
    d.image_instructions = ""

    t = c.train = ml_collections.ConfigDict()
    t.seed = 0
    t.mesh = MESH[variant]
    t.batch_size = 16  # global rows per step (LLM-CXR: 2 per GPU x 8)
    t.grad_accum = 1  # micro-batches per step (batch_size / grad_accum rows each)
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
    t.checkpoint_every = 1000
    t.keep_checkpoints = 5
    t.peak_flops = 0.0  # per device, for MFU; 0 = from the device table when known

    if variant == "tiny":
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
    return c
