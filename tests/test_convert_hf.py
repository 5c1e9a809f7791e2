"""HF GPT-NeoX <-> Flax: import with image rows, export, reload in transformers, bad inputs."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_helpers import left_padded_batch, load_hf, make_hf_model, make_tokenizer_dir
from safetensors import safe_open

from llmcxr_jax import checkpoint, cli, sharding
from llmcxr_jax.convert import hf_gpt_neox
from llmcxr_jax.infer.generate import greedy_generate

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
K = 38  # T = 303 after the Dolly keys, so T + K = 341 is odd and not a multiple of 128
MESH = "1,-1,1"


def _tensors(directory):
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _import(directory, k=K, **kw):
    kw.setdefault("dtype", "float32")
    return hf_gpt_neox.import_hf(directory, k, mesh=sharding.make_mesh(kw.pop("mesh", MESH)), **kw)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok_dir):
    """Table of 300 rows (the tokenizer before the Dolly keys), so the import must grow it."""
    d = str(tmp_path_factory.mktemp("hf"))
    make_hf_model(d, 300, tokenizer_dir=tok_dir)
    return d


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, hf_dir):
    """HF -> import-hf -> orbax checkpoint -> export-hf, through the command line."""
    ckpt = str(tmp_path_factory.mktemp("rt") / "ckpt")
    out = str(tmp_path_factory.mktemp("rt") / "export")
    assert cli.main(["import-hf", "--hf", hf_dir, "--out", ckpt, "--image-codes", str(K), "--dtype", "float32"]) == 0
    assert cli.main(["export-hf", "--ckpt", ckpt, "--out", out]) == 0
    return ckpt, out


def test_round_trip_keeps_keys_and_text_rows(hf_dir, round_trip):
    _, out = round_trip
    src, dst = _tensors(hf_dir), _tensors(out)
    assert set(src) == set(dst)
    for key, t in src.items():
        if key in ("gpt_neox.embed_in.weight", "embed_out.weight"):
            assert dst[key].shape == (303 + K, t.shape[1])
            np.testing.assert_array_equal(dst[key][:300], t)  # the text rows the table had
        else:
            np.testing.assert_array_equal(dst[key], t)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["vocab_size"] == 341 and cfg["rotary_pct"] == 0.25
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.25


def test_export_reloads_in_transformers_and_matches_on_image_tokens(round_trip):
    ckpt, out = round_trip
    lm = checkpoint.load_lm(ckpt, sharding.make_mesh(MESH), dtype="float32")
    hf = load_hf(out)
    assert hf.config.vocab_size == lm.layout.size == 341
    got = _assert_logits_match(lm, hf, seed=0, lengths=[20, 12], image_tokens=8, last_image_id=True)
    assert np.isneginf(got[..., 341:]).all() and got.shape[-1] == 384


def _assert_logits_match(lm, hf, *, seed: int, lengths: list[int], image_tokens: int,
                         last_image_id: bool = False) -> np.ndarray:
    """Our logits equal transformers' at 1e-4 on left-padded rows ending in `image_tokens` image codes
    (with last_image_id, the last one is code K - 1, right at the edge of the real rows); -> ours."""
    rng = np.random.default_rng(seed)
    ids, mask, pos = left_padded_batch(rng, 303, lengths, max(lengths))
    ids[:, -image_tokens:] = lm.layout.image_token(rng.integers(0, K, (2, image_tokens)))
    if last_image_id:
        ids[:, -1] = lm.layout.image_token(K - 1)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    got = np.asarray(lm.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[..., :341][real], ref[real], atol=1e-4, rtol=0)
    return got


def test_an_export_imports_back_with_its_own_image_rows(capsys, tmp_path, round_trip):
    """config.json records K, so import-hf of an export needs no --image-codes and gives back every
    row (the trained image rows too); another K is refused rather than misread. transformers keeps
    the key as a config attribute."""
    ckpt, out = round_trip
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["llmcxr_image_codes"] == K and load_hf(out).config.llmcxr_image_codes == K
    again = str(tmp_path / "again")
    assert cli.main(["import-hf", "--hf", out, "--out", again, "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_codes"] == K
    mesh = sharding.make_mesh(MESH)
    a, b = checkpoint.load_lm(ckpt, mesh), checkpoint.load_lm(again, mesh)
    assert a.layout == b.layout
    for x, y in zip(jax.tree.leaves(nnx.state(a.model, nnx.Param)), jax.tree.leaves(nnx.state(b.model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    err = _error(capsys, ["import-hf", "--hf", out, "--out", str(tmp_path / "o"), "--image-codes", "1024"])
    assert f"is an LLM-CXR export with {K} image-token rows" in err and f"import it with {K} image codes" in err


def test_exported_tokenizer_has_length_t_and_dolly_keys(round_trip):
    from transformers import AutoTokenizer

    _, out = round_trip
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 303
    assert tok.convert_tokens_to_ids("### Response:\n") != tok.unk_token_id
    assert tok.pad_token_id == tok.eos_token_id


def test_export_generation_config_names_the_exported_tokenizers_stop_ids(round_trip):
    """export-hf of an imported dolly-like directory: generation_config.json's eos / "### End" / pad
    are the ids the exported tokenizer gives those tokens, and the card states T and K."""
    from transformers import AutoTokenizer

    _, out = round_trip
    tok = AutoTokenizer.from_pretrained(out)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("### End")] == [0, 300]
    assert gen["pad_token_id"] == tok.pad_token_id and gen["top_p"] == 0.92 and gen["top_k"] == 0
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "T = 303" in card and f"K = {K}" in card and "| `### End` | 300 |" in card


def test_greedy_decoding_matches_transformers_generate(tmp_path):
    d = str(tmp_path / "hf")
    hf = make_hf_model(d, 97, seed=3)
    ours = _import(d, k=0).model
    ids, mask, _ = left_padded_batch(np.random.default_rng(5), 97, [7, 4], 7)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=20, pad_token_id=0).numpy()[:, 7:]
    got = np.asarray(greedy_generate(ours, ids, mask, 20))
    np.testing.assert_array_equal(got, ref)


def test_growing_table_matches_hf_resize_token_embeddings(tmp_path, tok_dir):
    """Table longer than T (Pythia pads its table): image rows reuse rows T.. exactly as HF does."""
    d = str(tmp_path / "hf")
    make_hf_model(d, 320, tokenizer_dir=tok_dir)
    imp = _import(d)
    hf = load_hf(d)
    hf.resize_token_embeddings(303 + K, mean_resizing=False)
    ref = hf.gpt_neox.embed_in.weight.detach().numpy()
    ours = np.asarray(imp.model.embed_in["embedding"].get_value())
    assert ref.shape[0] == imp.layout.size == 341
    np.testing.assert_array_equal(ours[:320], ref[:320])  # kept rows, including 303..319
    new = ours[320:341]
    assert abs(new.std() - 0.02) < 0.005 and abs(new.mean()) < 0.005  # normal(0, initializer_range)
    assert not ours[341:].any()  # padding rows are zero


def test_mean_init_of_new_rows(hf_dir):
    imp = _import(hf_dir, new_rows="mean")
    emb = np.asarray(imp.model.embed_in["embedding"].get_value())
    src = _tensors(hf_dir)["gpt_neox.embed_in.weight"]
    np.testing.assert_allclose(emb[300:341], np.broadcast_to(src.mean(0), (41, src.shape[1])), atol=1e-6)


def test_legacy_config_bin_and_sharded_inputs_import_alike(tmp_path, tok_dir):
    """dolly-v2-3b's own form (transformers 4.x config keys, pytorch_model.bin with embed_out) and a sharded
    safetensors directory, with every key the legacy path reads away from its default (rotary_pct 0.5, not 0.25;
    rotary_emb_base 5000, not 10000; sequential, not parallel, residual): each tensor and the logits equal
    transformers' own reading of the same model."""
    kw = dict(parallel=False, rotary_pct=0.5, rotary_base=5000, tokenizer_dir=tok_dir, seed=3)
    modern, legacy, sharded = (str(tmp_path / n) for n in ("modern", "legacy_bin", "sharded"))
    make_hf_model(modern, 300, **kw)
    make_hf_model(legacy, 300, legacy_config=True, safe=False, **kw)
    config = json.load(open(os.path.join(legacy, "config.json")))
    assert "rope_parameters" not in config and os.path.isfile(os.path.join(legacy, "pytorch_model.bin"))
    assert (config["rotary_pct"], config["rotary_emb_base"], config["use_parallel_residual"]) == (0.5, 5000, False)
    ref = load_hf(modern)
    rope = ref.config.rope_parameters
    assert (rope["partial_rotary_factor"], rope["rope_theta"], ref.config.use_parallel_residual) == (0.5, 5000, False)
    ref.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    want = {k.replace("lm_head.", "embed_out."): v.numpy() for k, v in ref.state_dict().items()}
    ids = np.random.default_rng(4).integers(0, 300, (2, 11))
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(ids)).logits.numpy()
    for d in (legacy, sharded):
        imp = _import(d, k=0)
        cfg = imp.model.cfg
        assert (cfg.rotary_pct, cfg.rotary_base, cfg.use_parallel_residual) == (0.5, 5000.0, False), d
        got = {key.replace("lm_head.", "embed_out."): load() for key, load, _ in hf_gpt_neox.hf_tensors(imp.model,
                                                                                                       "float32")}
        assert set(want) <= set(got), sorted(set(want) - set(got))
        for key, w in want.items():  # the table grew past HF's 300 rows (Dolly keys, padding): compare those
            np.testing.assert_allclose(got[key][:w.shape[0]], w, atol=1e-4, rtol=0, err_msg=f"{d}: {key}")
        np.testing.assert_allclose(np.asarray(imp.model(jnp.asarray(ids)))[..., :300], logits, atol=1e-4, rtol=0,
                                   err_msg=d)


class _Calls:
    """A pickle that calls fn(*args) on load, the way a malicious __reduce__ does (as tests/test_torch_files.py)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_import_hf_refuses_a_pytorch_model_bin_that_runs_code(tmp_path, tok_dir, capsys):
    d, out = str(tmp_path / "evil_hf"), str(tmp_path / "ckpt")
    model = make_hf_model(d, 300, tokenizer_dir=tok_dir, safe=False)
    marker = str(tmp_path / "SIDE_EFFECT")
    state = {k.replace("lm_head.", "embed_out."): v for k, v in model.state_dict().items()}
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = _Calls(os.system, f"touch {marker}")
    path = os.path.join(d, "pytorch_model.bin")
    torch.save(state, path)
    capsys.readouterr()
    assert cli.main(["import-hf", "--hf", d, "--out", out, "--image-codes", str(K), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # beside the progress bars
    assert len(errors) == 1 and errors[0].startswith("llmcxr import-hf: error:"), err
    assert f"refusing {os.system.__module__}.system:" in errors[0] and path in errors[0], err
    assert not os.path.exists(marker) and not os.path.exists(out)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert os.path.exists(marker)


def test_scan_layers_import_and_export_equal_plain(tmp_path, hf_dir):
    plain, scanned = _import(hf_dir), _import(hf_dir, scan_layers=True)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 341, (2, 9)))
    np.testing.assert_allclose(np.asarray(scanned.model(ids)), np.asarray(plain.model(ids)), atol=1e-5, rtol=0)
    hf_gpt_neox.export_hf(scanned.model, str(tmp_path / "a"))
    hf_gpt_neox.export_hf(plain.model, str(tmp_path / "b"))
    a, b = _tensors(str(tmp_path / "a")), _tensors(str(tmp_path / "b"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_sharded_export_loads_in_transformers(tmp_path, hf_dir):
    imp = _import(hf_dir)
    names = hf_gpt_neox.export_hf(imp.model, str(tmp_path / "out"), max_shard_bytes=60_000,
                                  tokenizer=imp.tokenizer, tokenizer_config=imp.tokenizer_config)
    assert len(names) > 2 and os.path.isfile(str(tmp_path / "out" / "model.safetensors.index.json"))
    hf = load_hf(str(tmp_path / "out"))
    ids = np.random.default_rng(3).integers(0, 341, (1, 10))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(imp.model(jnp.asarray(ids)))[..., :341], ref, atol=1e-4, rtol=0)


def test_bf16_params_export_and_reload(tmp_path, hf_dir):
    import ml_dtypes

    imp = _import(hf_dir, param_dtype="bfloat16", dtype="bfloat16")
    out = str(tmp_path / "bf16")
    hf_gpt_neox.export_hf(imp.model, out, dtype="bfloat16")
    t = _tensors(out)
    assert t["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].dtype == ml_dtypes.bfloat16
    ours = np.asarray(imp.model.layers[0].mlp.dense_h_to_4h["kernel"].get_value())
    np.testing.assert_array_equal(t["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], ours.T)
    hf = load_hf(out)  # transformers reads the bf16 files
    assert hf.config.vocab_size == 341
    back = _import(out, k=0, param_dtype="bfloat16")  # and we read them back bit for bit
    np.testing.assert_array_equal(np.asarray(back.model.layers[0].mlp.dense_h_to_4h["kernel"].get_value()), ours)


# ------------------------------------------------------------------ bad input


def _error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("llmcxr")]
    assert code == 2 and len(lines) == 1 and err.endswith(lines[0]), err  # progress bars aside, one line
    return lines[0]


def test_missing_directory(capsys, tmp_path):
    err = _error(capsys, ["import-hf", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "does not exist" in err


def test_other_architecture(capsys, tmp_path, hf_dir):
    d = str(tmp_path / "llama")
    shutil.copytree(hf_dir, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    message = _error(capsys, ["import-hf", "--hf", d, "--out", str(tmp_path / "o")])
    assert "model_type 'llama', not 'gpt_neox'" in message


def test_tensor_shape_mismatch(capsys, tmp_path, hf_dir):
    d = str(tmp_path / "bad")
    shutil.copytree(hf_dir, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 100
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    err = _error(capsys, ["import-hf", "--hf", d, "--out", str(tmp_path / "o")])
    assert "dense_h_to_4h.weight has shape (128, 64), config.json implies (100, 64)" in err


def test_missing_weights(capsys, tmp_path, hf_dir):
    d = str(tmp_path / "noweights")
    os.makedirs(d)
    shutil.copy(os.path.join(hf_dir, "config.json"), d)
    assert "holds no model.safetensors" in _error(capsys, ["import-hf", "--hf", d, "--out", str(tmp_path / "o")])


def test_vocabulary_mismatch_between_checkpoint_and_tokenizer(capsys, tmp_path, round_trip):
    ckpt, _ = round_trip
    bad = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, bad)
    shutil.rmtree(os.path.join(bad, "tokenizer"))
    make_tokenizer_dir(os.path.join(bad, "tokenizer"), vocab_size=280)
    err = _error(capsys, ["export-hf", "--ckpt", bad, "--out", str(tmp_path / "o")])
    assert "has 283 tokens but the checkpoint's vocabulary has T = 303" in err


def test_not_a_checkpoint(capsys, tmp_path):
    os.makedirs(tmp_path / "empty")
    assert "holds no orbax checkpoint" in _error(capsys, ["export-hf", "--ckpt", str(tmp_path / "empty"),
                                                         "--out", str(tmp_path / "o")])


def test_mesh_that_does_not_fit(capsys, tmp_path, hf_dir):
    err = _error(capsys, ["import-hf", "--hf", hf_dir, "--out", str(tmp_path / "o"), "--mesh", "1,3,1"])
    assert "uses 3 devices but 8 are present" in err


def test_export_reads_params_out_of_a_full_train_state(tmp_path, round_trip):
    """A training checkpoint (params + optimizer state + step) exports like a params-only one."""
    ckpt, out = round_trip
    lm = checkpoint.load_lm(ckpt, sharding.make_mesh(MESH))
    params = nnx.state(lm.model, nnx.Param).to_pure_dict()
    state = {"params": params, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)}, "step": jnp.int32(7)}
    full = str(tmp_path / "full")
    checkpoint.save_state(full, state, lm.metadata, step=7)
    shutil.copytree(os.path.join(ckpt, "tokenizer"), os.path.join(full, "tokenizer"))
    assert cli.main(["export-hf", "--ckpt", full, "--out", str(tmp_path / "exp")]) == 0
    a, b = _tensors(out), _tensors(str(tmp_path / "exp"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_import_places_each_tensor_sharded_on_the_mesh(hf_dir):
    plain = _import(hf_dir)
    sharded = _import(hf_dir, mesh="1,2,4", scan_layers=True)
    layout = sharded.layout
    kernel = sharded.model.layers.mlp.dense_h_to_4h["kernel"].get_value()  # [layers, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert layout.padded_size % 4 == 0
    emb = sharded.model.embed_in["embedding"].get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 341, (2, 9)))
    with jax.set_mesh(kernel.sharding.mesh):
        got = nnx.jit(lambda m, x: m(x))(sharded.model, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain.model(ids)), atol=1e-5, rtol=0)


def test_rows_past_the_tokenizer_are_never_cut_silently(capsys, tmp_path, tok_dir):
    """A table with N rows past T: more than K would be cut (refused, naming --image-codes N); fewer
    become the first image codes, kept exactly, with a note on stderr; exactly K is silent."""
    d = str(tmp_path / "hf")
    make_hf_model(d, 303 + 20, tokenizer_dir=tok_dir)
    err = _error(capsys, ["import-hf", "--hf", d, "--out", str(tmp_path / "cut"), "--image-codes", "16"])
    assert "has 20 rows past the tokenizer's T = 303" in err and "give --image-codes 20" in err
    assert not os.path.exists(tmp_path / "cut")
    assert cli.main(["import-hf", "--hf", d, "--out", str(tmp_path / "k38"), "--image-codes", str(K),
                     "--dtype", "float32"]) == 0
    note = capsys.readouterr().err
    assert "20 rows past the tokenizer's T = 303; they become image codes 0..19 and 18 rows are new" in note
    lm = checkpoint.load_lm(str(tmp_path / "k38"), sharding.make_mesh(MESH))
    table = _tensors(d)["gpt_neox.embed_in.weight"]
    rows = np.asarray(lm.model.embed_in["embedding"][...])
    np.testing.assert_array_equal(rows[303:323], table[303:323])  # the 20 rows kept as codes 0..19
    assert cli.main(["import-hf", "--hf", d, "--out", str(tmp_path / "k20"), "--image-codes", "20"]) == 0
    assert "rows past the tokenizer" not in capsys.readouterr().err


def test_export_drops_the_sources_bookkeeping(tmp_path, hf_dir):
    """transformers_version, custom_pipelines and a training-time use_cache false of the source are
    not carried into an export's config.json."""
    src = str(tmp_path / "src")
    shutil.copytree(hf_dir, src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(transformers_version="4.28.1", use_cache=False,
               custom_pipelines={"text-generation": {"impl": "instruct_pipeline.InstructionTextGenerationPipeline"}})
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert cli.main(["import-hf", "--hf", src, "--out", ckpt, "--image-codes", str(K), "--dtype", "float32"]) == 0
    assert cli.main(["export-hf", "--ckpt", ckpt, "--out", out]) == 0
    exported = json.load(open(os.path.join(out, "config.json")))
    assert "custom_pipelines" not in exported and exported["use_cache"] is True
    assert exported.get("transformers_version") != "4.28.1"


# ------------------------------------------------------------------ exports old stacks read (LLM-CXR pins
# transformers 4.28.1 and tokenizers 0.13.3, without the safetensors package)


def _texts():
    """Reports, prompts, the Dolly keys and "<image>": what an LLM-CXR tokenizer has to encode alike."""
    from hf_helpers import CORPUS

    from llmcxr_jax import vocab
    from llmcxr_jax.data import prompts

    texts = list(CORPUS) + [s.lower() for s in CORPUS] + list(vocab.DOLLY_SPECIAL_TOKENS) + ["<image>", "<|endoftext|>"]
    for instruction in ("Write the radiology report for this chest X-ray.", "Generate a chest X-ray image that "
                        "corresponds to the report.", "Is there a pleural effusion?"):
        texts.append(prompts.generation_prompt(instruction, prompts.IMAGE_MARKER))
        texts.append(prompts.generation_prompt(instruction, CORPUS[1]))
        texts.append(prompts.format_prompt(instruction, CORPUS[2] + " " + vocab.END_KEY, "<image>"))
    texts += ["  two  spaces\tand a tab\n\nnew lines", "ünïcödé ✓ and émphysema", "### End### Response:\n<image>",
              "", " ", "12 mm nodule at T11-T12; 3.5 cm. (compare 2019-04-01)",
              "FINDINGS:\n  PA and lateral views. Endotracheal tube tip 4 cm above the carina.",
              "IMPRESSION: Interval increase in bilateral opacities, worrisome for pulmonary edema.",
              "No focal consolidation, pleural effusion, or pneumothorax is seen.",
              "Cardiomediastinal silhouette is unremarkable; osseous structures intact."]
    return texts


def test_exported_tokenizer_has_string_merges_and_encodes_like_the_source(hf_dir, round_trip):
    """tokenizer.json's merges are "a b" strings (the form tokenizers 0.13 reads), split back they are the
    source's merges in order, and today's tokenizers and transformers encode every text as the source does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from llmcxr_jax import vocab

    _, out = round_trip
    source = json.load(open(os.path.join(hf_dir, "tokenizer.json")))["model"]["merges"]
    assert all(isinstance(m, list) for m in source)  # today's tokenizers writes pairs: the export converted them
    merges = json.load(open(os.path.join(out, "tokenizer.json")))["model"]["merges"]
    assert merges and all(isinstance(m, str) for m in merges)
    assert [m.split(" ") for m in merges] == source
    ours, _, _ = vocab.load_tokenizer(hf_dir)  # the source with the Dolly keys added, as import-hf reads it
    exported = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(out)
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["tokenizer_class"] == "PreTrainedTokenizerFast"
    texts = _texts()
    assert len(texts) >= 30
    for text in texts:
        want = ours.encode(text).ids
        assert exported.encode(text).ids == want, text
        assert hf(text, add_special_tokens=False).input_ids == want, text
    assert [hf.convert_tokens_to_ids(t) for t in vocab.DOLLY_SPECIAL_TOKENS] == [300, 301, 302]


def test_merges_holding_a_space_stay_pairs():
    """A BPE without byte-level mapping can merge a real space; "a b" strings would split such a merge
    wrongly, so those stay ["a", "b"] pairs and still read back identically."""
    from tokenizers import Tokenizer, models, trainers

    from llmcxr_jax import vocab

    tok = Tokenizer(models.BPE())  # no pre-tokenizer: the space is an ordinary symbol
    tok.train_from_iterator(["no acute process. no effusion. no pneumothorax."] * 20,
                            trainers.BpeTrainer(vocab_size=60, show_progress=False))
    pairs = json.loads(tok.to_str())["model"]["merges"]
    assert any(" " in part for m in pairs for part in m)
    written = json.loads(vocab.portable_tokenizer_json(tok))["model"]["merges"]
    assert written == pairs
    back = Tokenizer.from_str(vocab.portable_tokenizer_json(tok))
    assert back.encode("no acute effusion.").ids == tok.encode("no acute effusion.").ids


def test_import_reads_both_merge_forms(tmp_path, hf_dir):
    """A HF directory whose tokenizer.json has ["a", "b"] merges (tokenizers >= 0.20) and one with "a b"
    merges (older, and our exports) import to the same tokenizer and weights."""
    strings = str(tmp_path / "string_merges")
    shutil.copytree(hf_dir, strings)
    data = json.load(open(os.path.join(strings, "tokenizer.json")))
    assert isinstance(data["model"]["merges"][0], list)  # hf_dir keeps the pair form
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    json.dump(data, open(os.path.join(strings, "tokenizer.json"), "w"))
    a, b = _import(hf_dir), _import(strings)
    assert a.layout == b.layout and a.special == b.special
    for text in _texts():
        assert a.tokenizer.encode(text).ids == b.tokenizer.encode(text).ids, text
    np.testing.assert_array_equal(np.asarray(a.model.embed_in["embedding"].get_value()),
                                  np.asarray(b.model.embed_in["embedding"].get_value()))


def _bin_tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".bin"):
            part = torch.load(os.path.join(directory, name), weights_only=True)  # plain tensors only
            assert all(type(t) is torch.Tensor for t in part.values())
            out.update({k: t.numpy() for k, t in part.items()})
    return out


def _logits_match(ckpt, directory):
    lm = checkpoint.load_lm(ckpt, sharding.make_mesh(MESH), dtype="float32")
    _assert_logits_match(lm, load_hf(directory), seed=4, lengths=[16, 9], image_tokens=6)


def test_bin_export_loads_with_weights_only_and_in_transformers(tmp_path, round_trip):
    """--weights bin: pytorch_model.bin alone, plain tensors equal to the safetensors export's, read by
    torch.load(weights_only=True) and by transformers, which gives our logits; the card names the file."""
    ckpt, out = round_trip
    b = str(tmp_path / "bin")
    assert cli.main(["export-hf", "--ckpt", ckpt, "--out", b, "--weights", "bin"]) == 0
    names = sorted(os.listdir(b))
    assert "pytorch_model.bin" in names and not [n for n in names if "safetensors" in n or "index" in n]
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(names)
    got, want = _bin_tensors(b), _tensors(out)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    _logits_match(ckpt, b)
    card = open(os.path.join(b, "README.md"), encoding="utf-8").read()
    assert "- Files: `pytorch_model.bin`, `config.json`" in card and "weights_only=True" in card
    assert "model.safetensors" not in card


def test_sharded_bin_export_has_transformers_names_and_index(tmp_path, round_trip):
    """--weights bin past --max-shard-size: pytorch_model-0000N-of-0000M.bin plus pytorch_model.bin.index.json
    naming every tensor's shard; transformers loads it. --weights both writes the same tensors twice."""
    ckpt, out = round_trip
    b = str(tmp_path / "bin")
    assert cli.main(["export-hf", "--ckpt", ckpt, "--out", b, "--weights", "bin", "--max-shard-size", "60KB"]) == 0
    shards = sorted(n for n in os.listdir(b) if n.endswith(".bin"))
    total = len(shards)
    assert total > 2 and shards == [f"pytorch_model-{i:05d}-of-{total:05d}.bin" for i in range(1, total + 1)]
    index = json.load(open(os.path.join(b, "pytorch_model.bin.index.json")))
    tensors = _bin_tensors(b)
    assert set(index["weight_map"]) == set(tensors) == set(_tensors(out))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for key, shard in index["weight_map"].items():
        assert key in torch.load(os.path.join(b, shard), weights_only=True)
    _logits_match(ckpt, b)
    both = str(tmp_path / "both")
    assert cli.main(["export-hf", "--ckpt", ckpt, "--out", both, "--weights", "both", "--max-shard-size", "60KB"]) == 0
    assert os.path.isfile(os.path.join(both, "model.safetensors.index.json"))
    st, bn = _tensors(both), _bin_tensors(both)
    assert set(st) == set(bn) == set(tensors)
    for key in st:
        np.testing.assert_array_equal(st[key], bn[key])
    card = open(os.path.join(both, "README.md"), encoding="utf-8").read()
    assert "`model.safetensors.index.json`" in card and "`pytorch_model.bin.index.json`" in card


def test_bf16_bin_export_keeps_the_bits(tmp_path, hf_dir):
    import ml_dtypes

    imp = _import(hf_dir, param_dtype="bfloat16", dtype="bfloat16")
    out = str(tmp_path / "bf16")
    assert hf_gpt_neox.export_hf(imp.model, out, dtype="bfloat16", weights="both") == [
        "model.safetensors", "pytorch_model.bin"]
    state = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    key = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    assert state[key].dtype == torch.bfloat16
    np.testing.assert_array_equal(state[key].view(torch.uint16).numpy(),
                                  _tensors(out)[key].astype(ml_dtypes.bfloat16).view(np.uint16))
