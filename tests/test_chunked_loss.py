"""train.logits_chunk: the cross entropy over sequence slices gives the loss sums and gradients of the
whole-row logits, on packed rows with image/text targets and a padded vocabulary; its compiled
loss + gradient needs well under the whole logits' memory; a bad chunk size fails in one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_run_helpers import STAGE1

from llmcxr_jax import configs, sharding, vocab
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, init_model
from llmcxr_jax.train import chunked_loss, lm

TEXT, IMAGE = 300, 37  # real rows: 337, stored (padded) rows: 384


def _model_config(vocab_size=TEXT + IMAGE, padded=384, hidden=32, heads=4, layers=1) -> GPTNeoXConfig:
    return GPTNeoXConfig(vocab_size=vocab_size, padded_vocab_size=padded, hidden_size=hidden, num_layers=layers,
                         num_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25, rotary_base=10000.0,
                         max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
                         attention_bias=True, hidden_act="gelu", initializer_range=0.02, dtype="float32",
                         param_dtype="float32", scan_layers=False, remat_policy="none")


def _packed_batch(rows: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of two or three packed examples and a padded tail: a text prompt (no loss), then a
    response of image codes or text; targets are the next token within each example."""
    rng = np.random.default_rng(seed)
    b = {k: np.zeros((rows, length), np.int32) for k in
         ("input_ids", "segment_ids", "positions", "targets", "loss_mask", "modality")}
    for r in range(rows):
        pos, seg = 0, 1
        while pos < length - 8:
            n = int(rng.integers(6, max(7, (length - pos) // 2 + 1)))
            n = min(n, length - pos - 2)
            prompt = int(rng.integers(2, n - 2))
            image = bool(rng.integers(0, 2))
            ids = rng.integers(0, TEXT, n)
            if image:
                ids[prompt:] = TEXT + rng.integers(0, IMAGE, n - prompt)
            sl = slice(pos, pos + n)
            b["input_ids"][r, sl] = ids
            b["segment_ids"][r, sl] = seg
            b["positions"][r, sl] = np.arange(n)
            b["targets"][r, pos:pos + n - 1] = ids[1:]
            b["loss_mask"][r, pos + prompt - 1:pos + n - 1] = 1
            b["modality"][r, pos + prompt - 1:pos + n - 1] = int(image)
            pos, seg = pos + n, seg + 1
    assert b["loss_mask"].sum() and (b["modality"] * b["loss_mask"]).sum() and (b["loss_mask"] == 0).any()
    return b


def _loss_and_grads(cfg, batch, chunk):
    graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)
    fn = jax.jit(jax.grad(lambda p, b: lm.token_losses(p, graphdef, b, chunk), has_aux=True))
    grads, sums = fn(params.to_pure_dict(), batch)
    return jax.tree.map(np.asarray, grads), {k: float(v) for k, v in sums.items()}


def test_chunked_loss_sums_and_gradients_equal_the_whole_logits():
    cfg, batch = _model_config(), _packed_batch(rows=2, length=64)
    ref_grads, ref_sums = _loss_and_grads(cfg, batch, 0)
    assert ref_sums["image_tokens"] > 0 and ref_sums["text_tokens"] > 0
    for chunk in (16, 64):  # four slices; one slice of the whole length (still the scan + remat path)
        grads, sums = _loss_and_grads(cfg, batch, chunk)
        for k, v in ref_sums.items():
            np.testing.assert_allclose(sums[k], v, rtol=1e-5, err_msg=f"{k}, chunk {chunk}")
        flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(ref_grads)
        assert len(flat) == len(ref_flat)
        for (path, g), (_, ref) in zip(flat, ref_flat):
            assert g.dtype == np.float32 and np.abs(ref).max() > 0, jax.tree_util.keystr(path)
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max(),
                                       err_msg=f"{jax.tree_util.keystr(path)}, chunk {chunk}")
    # per token, not only in sum: each slice's losses land at their own positions
    graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)

    @jax.jit
    def per_token(params, b):
        model = nnx.merge(graphdef, params)
        x = model.hidden_states(b["input_ids"], segment_ids=b["segment_ids"], position_ids=b["positions"])
        return ([chunked_loss.token_cross_entropy(model.head_logits, x, b["targets"], c) for c in (0, 16)],
                chunked_loss.token_cross_entropy(model.head_logits, x, b["targets"], 16, with_argmax=True),
                model.head_logits(x).argmax(-1))

    (whole, sliced), (with_argmax, argmax), want = per_token(params, batch)
    assert whole.shape == batch["targets"].shape and np.ptp(np.asarray(whole)) > 0.1
    np.testing.assert_allclose(sliced, whole, rtol=1e-5)
    # the held-out evaluation's predictions (train/lm_samples.py): the argmax of each slice's logits, in place
    np.testing.assert_allclose(with_argmax, sliced, rtol=1e-6)
    assert argmax.dtype == np.int32 and len(np.unique(np.asarray(want))) > 1
    np.testing.assert_array_equal(argmax, want)


def test_padded_vocab_rows_get_finite_zero_gradients():
    cfg, batch = _model_config(), _packed_batch(rows=2, length=32, seed=1)
    assert cfg.padded_vocab_size > cfg.vocab_size
    grads, sums = _loss_and_grads(cfg, batch, 8)
    assert np.isfinite(sums["text_loss_sum"] + sums["image_loss_sum"])
    for path, g in jax.tree.leaves_with_path(grads):
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
    head = grads["embed_out"]["kernel"]  # [embed, padded_vocab]
    assert np.abs(head[:, :cfg.vocab_size]).max() > 0
    np.testing.assert_array_equal(head[:, cfg.vocab_size:], 0.0)


def _tiny_run_config(chunk: int, seq_len: int = 64):
    c = configs.load_config(f"{STAGE1}:tiny")
    c.train.mesh, c.train.batch_size, c.train.warmup_steps = "2,2,2", 4, 0
    # Adam's first update is lr * g / (|g| + eps): with eps 1e-8 a gradient near 1e-8 (a vocabulary column
    # no target names) turns float32 round-off into visible parameter changes; 1e-3 keeps the update a
    # smooth function of the gradient, so equal parameters mean equal gradients
    c.train.adam_eps = 1e-3
    c.train.logits_chunk = chunk
    c.model.num_layers = 1
    c.data.seq_len = c.data.max_length = seq_len
    return c


@pytest.mark.slow  # compiles two whole train steps on a 2,2,2 mesh
def test_jitted_train_step_with_chunks_updates_params_as_whole_logits():
    mesh = sharding.make_mesh("2,2,2")  # rows over data x fsdp, the vocabulary over tensor
    batch = _packed_batch(rows=4, length=64, seed=2)
    batch["input_ids"] = batch["input_ids"] % 509  # the tiny config's text rows; image ids stay below 509 + 64
    batch["targets"] = batch["targets"] % 509
    results = []
    with jax.set_mesh(mesh):
        for chunk in (0, 16):
            config = _tiny_run_config(chunk)
            m = config.model
            layout = vocab.VocabLayout.create(int(m.text_size), int(m.image_codes), mesh.shape["tensor"])
            model_config = GPTNeoXConfig.from_config(m, layout)
            step = lm.jit_train_step(config, model_config, layout, mesh)
            params = nnx.state(init_model(model_config, 0), nnx.Param).to_pure_dict()
            before = jax.tree.map(np.asarray, params)
            state = jax.device_put({"params": params, "opt": step.tx.init(params), "step": jnp.zeros((), jnp.int32)},
                                   step.state_shardings)
            new_state, metrics = step.fn(state, lm.global_batch(batch, mesh))
            results.append((jax.tree.map(np.asarray, new_state["params"]), jax.device_get(metrics)))
    (ref_params, ref_metrics), (params, metrics) = results
    for k in ("loss", "loss_text", "loss_image", "grad_norm", "tokens"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
    assert ref_metrics["loss_image"] > 0 and ref_metrics["loss_text"] > 0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(np.abs(a - s).max() for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(before))) > 1e-4


@pytest.mark.parametrize("chunk", [24, -8])
def test_bad_chunk_size_fails_in_one_line(chunk):
    mesh = sharding.make_mesh("2,2,2")
    with pytest.raises(UsageError) as err:
        lm.lower_train_step(_tiny_run_config(chunk), mesh)
    message = str(err.value)
    assert "data.seq_len 64" in message and f"train.logits_chunk {chunk}" in message and "\n" not in message


def test_chunked_loss_compiles_to_well_under_the_whole_logits_memory():
    """rows 2 x length 512 x 8192 vocabulary: 32 MiB of float32 logits. One attention head, so the
    attention scores (2 MiB) do not hide what the logits take."""
    rows, length = 2, 512
    cfg = _model_config(vocab_size=8192 - 64, padded=8192, hidden=16, heads=1, layers=1)
    logits_bytes = rows * length * cfg.padded_vocab_size * 4
    graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in
             ("input_ids", "segment_ids", "positions", "targets", "loss_mask", "modality")}
    temp = {}
    for chunk in (0, 64):
        fn = jax.jit(jax.grad(lambda p, b, c=chunk: lm.token_losses(p, graphdef, b, c)[0]))
        analysis = fn.lower(params.to_pure_dict(), batch).compile().memory_analysis()
        assert analysis is not None, "this backend reports no memory analysis"
        temp[chunk] = analysis.temp_size_in_bytes
    assert temp[0] > logits_bytes, temp  # the whole logits (and their gradient) are live at once
    assert temp[64] < logits_bytes / 2, temp  # one 4 MiB slice of logits and its gradient at a time
