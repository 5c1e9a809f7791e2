"""Write a tiny stand-in for LLM-CXR's two released archives, with their directory and file names and in
the file formats the authors' tools wrote, so the commands a holder of the real files runs can be shown here.

    python examples/released_layout.py OUT [--sharded] [--seed 0]

OUT/llm-cxr/ stands for a clone of the original code with the archives unpacked into ckpts/, as its README
asks: a GPT-NeoX directory as transformers 4.28 wrote it (pytorch_model.bin, its table already T + K rows,
the Dolly tokenizer keys), and a taming VQ-GAN as a PyTorch Lightning 1.x .ckpt plus its project YAML. The
sizes are toy (hidden 64, 2 layers; a 64-code VQ-GAN with an 8x8 latent at 64 px: 64 codes per image, where
the release has 256 of 1024), the weights random. training/mimiccxr_vq_dataset.py is made up: our own
sentences in the two lists `llmcxr extract-instructions` reads. OUT/images/ holds synthetic CXRs and
OUT/reports.txt their two impressions (one per line) to prompt with.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import types

import numpy as np

# What the release calls things (the original README's install steps name them).
LLM_DIR = "llmcxr_mimic-cxr-256-txvloss-medvqa-stage1_2"
VQGAN_DIR = "vqgan_mimic-cxr-256-txvloss"
VQGAN_STEM = "2023-09-05T13-56-50_mimic-cxr-256-txvloss"
VQGAN_YAML = f"{VQGAN_STEM}-project-compat.yaml"
VQGAN_CKPT = f"{VQGAN_STEM}-4e-compat.ckpt"
INSTRUCTION_FILE = os.path.join("training", "mimiccxr_vq_dataset.py")

# Made up for this stand-in (not LLM-CXR's wording): what extract-instructions should find.
REPORT_INSTRUCTIONS = (
    "Report on this chest film as the reading radiologist would.",
    "Give the findings and the impression for the radiograph below.",
    "Put the attached chest X-ray into words for the referring doctor.",
)
IMAGE_INSTRUCTIONS = (
    "Paint the chest film that this dictation describes.",
    "Show me a radiograph consistent with the text below.",
    "Turn the following findings into a frontal chest X-ray.",
)

# Toy sizes. Dolly-v2-3b: hidden 2560, 32 layers, 32 heads, 2048 positions; the VQ-GAN: 256 px, 1024 codes.
HIDDEN, LAYERS, HEADS, POSITIONS, BPE_SIZE = 64, 2, 4, 512, 400
VQGAN_DDCONFIG = {"double_z": False, "z_channels": 32, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                  "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
EMBED_DIM, N_EMBED = 32, 64
# dolly-v2-3b's tokenizer adds the first three; LLM-CXR's training adds "### Response:\n" (so T = 50281).
ADDED_TOKENS = ("### End", "### Instruction:", "### Response:", "### Response:\n")
EOS = "<|endoftext|>"


# ---------------------------------------------------------------- the language model directory


def write_tokenizer(directory: str, texts: list[str]) -> int:
    """A byte-level BPE shaped like GPT-NeoX's (eos and padding first, Dolly keys added last), in the three
    files transformers 4.28 saves for it. Returns T = len(tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, special_tokens=[EOS, "<|padding|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    pieces = tok.encode("<image>").tokens
    if pieces != ["<", "image", ">"]:
        raise SystemExit(f"released_layout.py: the stand-in tokenizer splits '<image>' into {pieces}, "
                         "not '<' 'image' '>'")
    tok.save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "add_prefix_space": False, "bos_token": EOS, "clean_up_tokenization_spaces": True, "eos_token": EOS,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "GPTNeoXTokenizer",
        "unk_token": EOS})
    _write_json(os.path.join(directory, "special_tokens_map.json"), {
        "additional_special_tokens": ["### End", "### Instruction:", "### Response:\n"], "bos_token": EOS,
        "eos_token": EOS, "pad_token": EOS, "unk_token": EOS})  # LLM-CXR sets pad = eos
    return tok.get_vocab_size(with_added_tokens=True)


def lm_state_dict(rows: int, seed: int) -> collections.OrderedDict:
    """A random transformers GPTNeoXForCausalLM with `rows` = T + K embedding and head rows, keyed and ordered
    as transformers 4.28 (and DeepSpeed's zero_to_fp32) store it: per layer the attention buffers of that
    version (causal mask, masked_bias, rotary inv_freq) sit beside the weights, and the head is embed_out."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=rows, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=4 * HIDDEN, max_position_embeddings=POSITIONS, rotary_pct=0.25,
                        rotary_emb_base=10000, use_parallel_residual=True, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(cfg).float()
    with torch.no_grad():  # every tensor random, so an import that drops or re-initialises one shows
        for name, p in model.named_parameters():
            is_norm = "layernorm" in name or "layer_norm" in name
            p.copy_(((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p)) if is_norm
                    else 0.08 * torch.randn_like(p))
    weights = {k.replace("lm_head.", "embed_out."): v.detach().clone() for k, v in model.state_dict().items()
               if "rotary_emb" not in k}
    rotary_dims = int(HIDDEN // HEADS * 0.25)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims)
    causal = torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.bool)).view(1, 1, POSITIONS, POSITIONS)
    out = collections.OrderedDict([("gpt_neox.embed_in.weight", weights["gpt_neox.embed_in.weight"])])
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}."
        for name in ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                     "post_attention_layernorm.bias"):
            out[p + name] = weights[p + name]
        out[p + "attention.bias"] = causal.clone()
        out[p + "attention.masked_bias"] = torch.tensor(-1e9)
        out[p + "attention.rotary_emb.inv_freq"] = inv_freq.clone()
        for name in ("attention.query_key_value.weight", "attention.query_key_value.bias", "attention.dense.weight",
                     "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                     "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"):
            out[p + name] = weights[p + name]
    for name in ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"):
        out[name] = weights[name]
    return out


def write_weights(directory: str, state: collections.OrderedDict, sharded: bool) -> list[str]:
    """pytorch_model.bin (what zero_to_fp32.py writes: one float32 file), or, with `sharded`, the two
    pytorch_model-0000N-of-00002.bin files and index that transformers 4.28's save_pretrained makes of a
    float32 dolly-v2-3b-sized model at its default 10GB shards (11.1 GB of tensors: ~89% in the first)."""
    import torch

    if not sharded:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return ["pytorch_model.bin"]
    size = {k: v.numel() * v.element_size() for k, v in state.items()}
    limit = int(0.89 * sum(size.values()))
    shards, used = [collections.OrderedDict()], 0
    for key, tensor in state.items():  # transformers 4.28's shard_checkpoint: start a shard when one would overflow
        if used + size[key] > limit:
            shards.append(collections.OrderedDict())
            used = 0
        shards[-1][key] = tensor
        used += size[key]
    names = [f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        torch.save(shard, os.path.join(directory, name))
    _write_json(os.path.join(directory, "pytorch_model.bin.index.json"), {
        "metadata": {"total_size": sum(size.values())},
        "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}})
    return names


def write_lm(directory: str, texts: list[str], seed: int, sharded: bool) -> dict:
    os.makedirs(directory)
    text_size = write_tokenizer(directory, texts)
    rows = text_size + N_EMBED  # resize_token_embeddings(len(tokenizer) + codebook size), as LLM-CXR trained
    weights = write_weights(directory, lm_state_dict(rows, seed), sharded)
    _write_json(os.path.join(directory, "config.json"), {  # transformers 4.28's keys for a dolly-v2 fine-tune
        "_name_or_path": "stage1-checkpoint", "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0,
        "custom_pipelines": {"text-generation": {"impl": "instruct_pipeline.InstructionTextGenerationPipeline",
                                                 "pt": "AutoModelForCausalLM", "tf": "TFAutoModelForCausalLM"}},
        "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": 4 * HIDDEN, "layer_norm_eps": 1e-05, "max_position_embeddings": POSITIONS,
        "model_type": "gpt_neox", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.28.1", "use_cache": False, "use_parallel_residual": True, "vocab_size": rows})
    _write_json(os.path.join(directory, "generation_config.json"), {
        "_from_model_config": True, "bos_token_id": 0, "eos_token_id": 0, "transformers_version": "4.28.1",
        "use_cache": False})
    return {"text_size": text_size, "rows": rows, "weights": weights}


# ---------------------------------------------------------------- the VQ-GAN directory


@contextlib.contextmanager
def lightning_stand_ins():
    """pytorch_lightning's ModelCheckpoint and AttributeDict as classes of modules that exist only inside
    this block (put into sys.modules, taken out after, whatever was there restored), so a pickle names them
    exactly as a real Lightning 1.0.8 checkpoint does while neither package needs to be installed."""

    class ModelCheckpoint:
        """Only the class is pickled: Lightning keys each callback's state by its type."""

    class AttributeDict(dict):
        pass

    modules = {name: types.ModuleType(name) for name in (
        "pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
        "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")}
    for cls, module in ((ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"),
                        (AttributeDict, "pytorch_lightning.utilities.parsing")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    before = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(ModelCheckpoint=ModelCheckpoint, AttributeDict=AttributeDict)
    finally:
        for name, old in before.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def vqgan_config():
    from llmcxr_jax.models.vqgan import VQGANConfig

    dd = VQGAN_DDCONFIG
    return VQGANConfig(resolution=dd["resolution"], in_channels=dd["in_channels"], out_channels=dd["out_ch"],
                       ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                       attn_resolutions=tuple(dd["attn_resolutions"]), z_channels=dd["z_channels"],
                       embed_dim=EMBED_DIM, n_embed=N_EMBED, beta=0.25, dropout=dd["dropout"], legacy_loss=True,
                       dtype="float32", param_dtype="float32")


def loss_tensors(seed: int) -> dict[str, np.ndarray]:
    """taming's VQLPIPSWithDiscriminator entries: the PatchGAN discriminator (taming's 3 layers, narrower) and
    LPIPS' scaling layer and linear heads at their real shapes. LPIPS' VGG16 trunk (59 MB) is left out."""
    from llmcxr_jax.models import discriminator

    disc = discriminator.init_discriminator(discriminator.DiscriminatorConfig(3, 16, 3, "float32", "float32"), seed)
    out = dict(discriminator.to_taming_state_dict(disc))
    rng = np.random.default_rng(seed)
    out["loss.perceptual_loss.scaling_layer.shift"] = np.array([-.030, -.088, -.188], np.float32).reshape(1, 3, 1, 1)
    out["loss.perceptual_loss.scaling_layer.scale"] = np.array([.458, .448, .450], np.float32).reshape(1, 3, 1, 1)
    for i, width in enumerate((64, 128, 256, 512, 512)):
        out[f"loss.perceptual_loss.lin{i}.model.1.weight"] = rng.uniform(0, 0.1, (1, width, 1, 1)).astype(np.float32)
    return out


def lightning_checkpoint(generator: dict[str, np.ndarray], loss: dict[str, np.ndarray], lightning) -> dict:
    """What Lightning 1.0.8's dump_checkpoint writes for taming's VQModel: the state dict (taming names and
    loss.*), ModelCheckpoint's state keyed by its class, both Adam optimizers (one step taken), the
    hyper-parameters as an AttributeDict."""
    import torch

    state_dict = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in {**generator, **loss}.items())
    optimizers = []
    for group in (generator, {k: v for k, v in loss.items() if k.startswith("loss.discriminator.")}):
        params = [torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in group.items()
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        opt = torch.optim.Adam(params, lr=9e-6, betas=(0.5, 0.9))
        sum((p * p).sum() for p in params).backward()
        opt.step()
        optimizers.append(opt.state_dict())
    params = {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": dict(VQGAN_DDCONFIG)}
    return {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8",
            "callbacks": {lightning.ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": None,
                                                      "best_model_path": "", "current_score": torch.tensor(0.31),
                                                      "dirpath": "logs/checkpoints"}},
            "optimizer_states": optimizers, "lr_schedulers": [], "state_dict": state_dict,
            "hparams_name": "kwargs", "hyper_parameters": lightning.AttributeDict(params)}


def project_yaml() -> str:
    """The project YAML (taming's main.py saves one per run): model.target and params; data section omitted."""
    import yaml

    doc = {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": VQGAN_DDCONFIG,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {
            "disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000, "disc_weight": 0.8,
            "codebook_weight": 1.0}}}}}
    return yaml.safe_dump(doc, sort_keys=False)


def write_vqgan(directory: str, seed: int) -> dict:
    import torch

    from llmcxr_jax.convert import taming_vqgan
    from llmcxr_jax.models.vqgan import init_vqgan

    os.makedirs(directory)
    cfg = vqgan_config()
    generator = taming_vqgan.to_taming_state_dict(init_vqgan(cfg, seed=seed))
    loss = loss_tensors(seed + 1)
    with lightning_stand_ins() as lightning:
        torch.save(lightning_checkpoint(generator, loss, lightning), os.path.join(directory, VQGAN_CKPT))
    with open(os.path.join(directory, VQGAN_YAML), "w") as f:
        f.write(project_yaml())
    return {"codes": N_EMBED, "latent": cfg.latent_size, "resolution": cfg.resolution,
            "generator_tensors": len(generator), "loss_tensors": len(loss)}


# ---------------------------------------------------------------- the code clone and the inputs


def write_instruction_module(path: str) -> None:
    """A made-up training/mimiccxr_vq_dataset.py: other code around the two module-level literal lists."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('"""Made-up stand-in for LLM-CXR\'s file of this name (llmcxr-jax examples/released_layout.py):\n'
                'the two instruction lists hold llmcxr-jax\'s own sentences."""\nimport random\n\n')
        f.write(f"CXR_VQ_OUTPUT_INSTRUCTION_LIST = {json.dumps(list(IMAGE_INSTRUCTIONS), indent=4)}\n\n")
        f.write(f"CXR_VQ_INPUT_INSTRUCTION_LIST = {json.dumps(list(REPORT_INSTRUCTIONS), indent=4)}\n\n")
        f.write(f"CODEBOOK_SIZE = {N_EMBED}\n\n\ndef pick_instruction(image_is_input: bool) -> str:\n"
                "    return random.choice(CXR_VQ_INPUT_INSTRUCTION_LIST if image_is_input "
                "else CXR_VQ_OUTPUT_INSTRUCTION_LIST)\n")


def write_inputs(out: str, seed: int, count: int = 2) -> list[str]:
    """count synthetic frontal CXRs (256 px JPEGs) in OUT/images and their impressions in OUT/reports.txt."""
    from PIL import Image

    from llmcxr_jax.synthetic import phantom, text

    os.makedirs(os.path.join(out, "images"))
    reports = []
    for i in range(count):
        rng = np.random.default_rng([seed, 11, i])
        findings = text.sample_findings(rng)
        pixels = phantom.render_image(findings, "PA", 256, rng)
        Image.fromarray(pixels).save(os.path.join(out, "images", f"cxr_{i}.jpg"), quality=92)
        report, _ = text.report_text(findings, "CHEST (PA AND LAT)", True, rng)
        reports.append(" ".join(report.split("IMPRESSION:")[-1].split()))  # stage 2 trained on impressions
    with open(os.path.join(out, "reports.txt"), "w") as f:
        f.writelines(r + "\n" for r in reports)
    return reports


def tokenizer_texts(reports: list[str]) -> list[str]:
    from llmcxr_jax.data import prompts

    # "<image>" often enough that "image" is one token between "<" and ">", as in GPT-NeoX's tokenizer
    return [prompts.INTRO_BLURB, *["Input:\n<image>\n\n"] * 20, *REPORT_INSTRUCTIONS, *IMAGE_INSTRUCTIONS,
            *prompts.REPORT_INSTRUCTIONS, *reports]


def write_layout(out: str, seed: int = 0, sharded: bool = False) -> dict:
    """Everything above under OUT (which must not exist yet or be empty); returns what was written."""
    if os.path.isdir(out) and os.listdir(out):
        raise SystemExit(f"released_layout.py: {out} is not empty; give a new directory")
    repo = os.path.join(out, "llm-cxr")
    reports = write_inputs(out, seed)
    lm = write_lm(os.path.join(repo, "ckpts", LLM_DIR), tokenizer_texts(reports), seed, sharded)
    vq = write_vqgan(os.path.join(repo, "ckpts", VQGAN_DIR), seed)
    write_instruction_module(os.path.join(repo, INSTRUCTION_FILE))
    return {"repo": repo, "lm": lm, "vqgan": vq}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="new directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharded", action="store_true", help="two pytorch_model-*.bin shards and their index")
    args = p.parse_args()
    made = write_layout(args.out, args.seed, args.sharded)
    for folder, _, files in sorted(os.walk(args.out)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            print(f"{os.path.getsize(path):>10,d}  {os.path.relpath(path, args.out)}")
    lm, vq = made["lm"], made["vqgan"]
    print(f"LM: T = len(tokenizer) = {lm['text_size']}, table rows T + K = {lm['rows']} (config.json vocab_size); "
          f"VQ-GAN: K = {vq['codes']} codes, {vq['latent']}x{vq['latent']} latent at {vq['resolution']} px, "
          f"{vq['generator_tensors']} generator + {vq['loss_tensors']} loss.* tensors")


if __name__ == "__main__":
    main()
