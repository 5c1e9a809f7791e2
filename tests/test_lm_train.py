"""The LM trainer on a tiny synthetic setup: the loss falls; meshes, micro-batching and resume give
the same run; freeze masks hold; bad configs fail in one line."""
import os

import jax
import numpy as np
import pytest
from board_helpers import hparam_metrics, hparams, read_board, text, text_tags
from flax import nnx
from generator_helpers import VQ
from lm_run_helpers import make_setup, tiny_config

from llmcxr_jax import checkpoint
from llmcxr_jax.infer import train_samples
from llmcxr_jax.models.vqgan import init_vqgan
from llmcxr_jax.train import lm
from llmcxr_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("lmsetup")))


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def _params(workdir):
    lm_ = checkpoint.load_lm(os.path.join(workdir, "checkpoints"), jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")))
    return jax.tree.map(np.asarray, nnx.state(lm_.model, nnx.Param).to_pure_dict())


def test_tiny_stage1_lowers_the_loss(setup, tmp_path):
    vq_dir = str(tmp_path / "vqgan")  # a random VQ-GAN with the codes' shape: the eval step's samples draw with it
    checkpoint.save_vqgan(vq_dir, init_vqgan(VQ, 0))
    cfg = tiny_config(setup, "--config.train.steps=30", "--config.train.log_every=1", "--config.train.eval_every=30",
                      f"--config.train.samples_vqgan={vq_dir}", "--config.train.samples=3")
    out = lm.train(cfg, str(tmp_path / "run"), echo=False, sampler=train_samples.sampler)
    tmp_path = tmp_path / "run"
    assert out["step"] == 30 and out["source"] == "scratch"
    losses = [loss for _, loss in _losses(str(tmp_path))]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert any("eval_loss" in r and np.isfinite(r["eval_loss"]) for r in records)
    first = records[0]
    for key in ("loss_text", "loss_image", "learning_rate", "grad_norm", "param_norm", "update_norm",
                "tokens_per_s", "step_time_s"):
        assert key in first and np.isfinite(first[key]), key
    assert first["loss_image"] > 0 and first["loss_text"] > 0
    # TensorBoard's reader: the metrics.jsonl numbers, the held-out row's teacher-forced predictions at the eval
    # step, the run config as hparams
    acc = read_board(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {k for r in records for k in r} - {"step"}
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 31))
    assert [e.step for e in acc.Scalars("eval_loss")] == [30]
    assert text_tags(acc) == {"held_out_predictions/text_summary", "sampled_reports/text_summary"}
    ((step, table),) = text(acc, "held_out_predictions/text_summary")
    assert step == 30 and table.splitlines()[0] == ("| prompt | reference response | teacher-forced prediction | "
                                                    "tokens right |")
    assert len(table.splitlines()) >= 3 and "### Response:" in table
    # sampled at the eval step: 3 held-out images' reports, and the CXRs drawn from their reference reports under
    # the VQ-GAN's reconstructions of the real codes (32 px each)
    ((step, sampled),) = text(acc, "sampled_reports/text_summary")
    assert step == 30 and sampled.splitlines()[0] == "| dicom id | reference report | sampled report |"
    assert len(sampled.splitlines()) == 2 + 3
    assert [(e.step, e.height, e.width) for e in acc.Images("real_vs_drawn")] == [(30, 64, 96)]
    assert hparams(acc)["train.steps"] == 30 and hparam_metrics(acc) == ["loss", "eval_loss"]


@pytest.mark.parametrize("mesh", [pytest.param("1,8,1", marks=pytest.mark.slow), "2,2,2"])
def test_meshes_give_the_same_loss_curve(setup, tmp_path, mesh):
    common = ["--config.train.steps=10", "--config.train.log_every=1", "--config.train.eval_every=0"]
    lm.train(tiny_config(setup, *common, "--config.train.mesh=8,1,1"), str(tmp_path / "ref"), echo=False)
    lm.train(tiny_config(setup, *common, f"--config.train.mesh={mesh}"), str(tmp_path / "other"), echo=False)
    ref, other = _losses(str(tmp_path / "ref")), _losses(str(tmp_path / "other"))
    np.testing.assert_allclose([loss for _, loss in other], [loss for _, loss in ref], rtol=1e-5)


@pytest.mark.slow  # the gradients themselves: test_micro_batches_and_remat_policies_give_the_same_gradients
def test_grad_accumulation_equals_one_big_batch(setup, tmp_path):
    common = ["--config.train.steps=4", "--config.train.log_every=1", "--config.train.eval_every=0",
              "--config.train.mesh=2,1,4"]  # 4-row micro-batches over data 2, tensor 4
    lm.train(tiny_config(setup, *common), str(tmp_path / "one"), echo=False)
    lm.train(tiny_config(setup, *common, "--config.train.grad_accum=2"), str(tmp_path / "two"), echo=False)
    one, two = (read_metrics(str(tmp_path / n / "metrics.jsonl")) for n in ("one", "two"))
    for key in ("loss", "grad_norm", "loss_image", "loss_text"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5, err_msg=key)


def _grads(setup, remat="none", accum=1):
    """Gradients of one real batch of the tiny setup, on a (2,2,2) mesh."""
    import grain
    from flax import nnx

    from llmcxr_jax import sharding
    from llmcxr_jax.data import packing
    from llmcxr_jax.models.gpt_neox import init_model
    from llmcxr_jax.train import lm_data
    from llmcxr_jax.train import state as state_lib

    cfg = tiny_config(setup, f"--config.model.remat_policy={remat}")
    mesh = sharding.make_mesh("2,2,2")
    sources = lm_data.read_sources(cfg.data)
    source = state_lib.start_source(cfg, os.path.join(setup["root"], "no-run"))
    start = state_lib.resolve_start(cfg, mesh, sources.codebook_size, source)
    assert start.source == "scratch"
    pipe = lm_data.make_batches(sources, "train", start.tokenizer, start.special, start.layout, cfg.data, 8,
                                shard=grain.sharding.ShardOptions(0, 1))
    batch = {k: v for k, v in next(pipe.iterator()).items() if k in packing.BATCH_SPEC}
    model = init_model(start.config, 0)
    graphdef, params = nnx.split(model, nnx.Param)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, b: lm.accumulate_gradients(p, graphdef, b, accum))
        grads, sums = fn(params.to_pure_dict(), batch)
    return jax.tree.map(np.asarray, grads), float(sums["tokens"])


def test_micro_batches_and_remat_policies_give_the_same_gradients(setup):
    ref, tokens = _grads(setup)
    assert tokens > 0
    for kwargs in ({"accum": 2}, {"accum": 4}, {"remat": "full"}, {"remat": "dots_no_batch"}):
        other, other_tokens = _grads(setup, **kwargs)
        assert other_tokens == tokens
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(other)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=str(kwargs))


@pytest.mark.slow  # bit-exact resume after a SIGKILL at any step: tests/test_lm_signals.py
def test_interrupted_run_resumes_to_the_same_parameters(setup, tmp_path):
    common = ["--config.train.steps=8", "--config.train.log_every=1", "--config.train.eval_every=0",
              "--config.train.checkpoint_every=100"]
    lm.train(tiny_config(setup, *common), str(tmp_path / "straight"), echo=False)
    out = lm.train(tiny_config(setup, *common), str(tmp_path / "split"), stop_after=3, echo=False)
    assert out["step"] == 3
    lm.train(tiny_config(setup, *common), str(tmp_path / "split"), echo=False)
    a, b = _params(str(tmp_path / "straight")), _params(str(tmp_path / "split"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert _losses(str(tmp_path / "split"))[-5:] == _losses(str(tmp_path / "straight"))[-5:]


def test_image_rows_only_keeps_text_rows(setup, tmp_path):
    cfg = tiny_config(setup, "--config.train.steps=2", "--config.train.eval_every=0",
                      "--config.train.image_rows_only=True")
    lm.train(cfg, str(tmp_path / "a"), stop_after=1, echo=False)
    before = _params(str(tmp_path / "a"))
    lm.train(cfg, str(tmp_path / "a"), echo=False)
    after = _params(str(tmp_path / "a"))
    meta = checkpoint.read_metadata(str(tmp_path / "a" / "checkpoints"))
    first, last = meta["vocab"]["text_size"], meta["vocab"]["text_size"] + meta["vocab"]["image_codes"]
    emb0, emb1 = before["embed_in"]["embedding"], after["embed_in"]["embedding"]
    np.testing.assert_array_equal(emb0[:first], emb1[:first])
    assert np.abs(emb0[first:last] - emb1[first:last]).max() > 0
    np.testing.assert_array_equal(before["final_layer_norm"]["scale"], after["final_layer_norm"]["scale"])


@pytest.mark.parametrize("override, message", [
    ("--config.train.mesh=3,1,1", "devices"),
    ("--config.train.batch_size=6", "does not divide"),
    ("--config.train.init_from=/nonexistent/hf", "does not exist"),
    ("--config.train.grad_accum=3", "grad_accum"),
])
def test_bad_configs_fail_in_one_line(setup, tmp_path, capsys, override, message):
    from lm_run_helpers import STAGE1

    from llmcxr_jax import cli

    args = ["train", "--config", f"{STAGE1}:tiny", "--workdir", str(tmp_path / "run"),
            f"--config.data.root={setup['root']}", f"--config.data.codes={setup['codes']}",
            f"--config.data.tokenizer={setup['tokenizer']}", "--config.model.image_codes=64", override]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_checkpoint_restores_onto_another_mesh(setup, tmp_path):
    from llmcxr_jax import sharding

    cfg = tiny_config(setup, "--config.train.steps=2", "--config.train.eval_every=0",
                      "--config.train.mesh=8,1,1")
    lm.train(cfg, str(tmp_path), echo=False)
    ref = _params(str(tmp_path))
    other = checkpoint.load_lm(str(tmp_path / "checkpoints"), sharding.make_mesh("2,2,2"))
    emb = other.model.embed_in["embedding"].get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    got = jax.tree.map(np.asarray, nnx.state(other.model, nnx.Param).to_pure_dict())
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    by_workdir = checkpoint.load_lm(str(tmp_path), sharding.make_mesh("2,2,2"))  # the workdir stands for it
    assert by_workdir.step == other.step and by_workdir.tokenizer is not None
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(nnx.state(by_workdir.model, nnx.Param).to_pure_dict())):
        np.testing.assert_array_equal(a, np.asarray(b))
    # and training continues there
    more = tiny_config(setup, "--config.train.steps=3", "--config.train.eval_every=0", "--config.train.mesh=2,2,2")
    assert lm.train(more, str(tmp_path), echo=False)["step"] == 3


def test_non_finite_loss_stops_before_a_poisoned_checkpoint(setup, tmp_path):
    cfg = tiny_config(setup, "--config.train.steps=6", "--config.train.eval_every=0", "--config.train.warmup_steps=0",
                      "--config.train.checkpoint_every=1", "--config.train.learning_rate=1e30",
                      "--config.train.grad_clip=0.0")
    with pytest.raises(lm.NonFiniteLoss) as e:
        lm.train(cfg, str(tmp_path), echo=False)
    message = str(e.value)
    step = int(message.split(" at step ")[1].split(";")[0])
    assert "batch examples" in message and ":" in message.split("batch examples")[1]
    saved = checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints"), keep=5)
    try:
        assert saved.latest_step() == step - 1 and f"checkpoints/{step - 1}" in message
    finally:
        saved.close()


def test_frontal_only_stage1_keeps_the_pa_ap_images(setup):
    from llmcxr_jax.data import mimic_cxr
    from llmcxr_jax.train import lm_data

    views = {r.dicom_id: r.view for r in mimic_cxr.load_corpus(setup["root"], progress=False).records}
    every = lm_data.read_sources(tiny_config(setup).data).train["image_text"]
    frontal = lm_data.read_sources(tiny_config(setup, "--config.data.views=frontal").data).train["image_text"]
    assert {views[e.dicom_id] for e in every} - mimic_cxr.FRONTAL_VIEWS  # the corpus has laterals
    assert [e for e in every if views[e.dicom_id] in mimic_cxr.FRONTAL_VIEWS] == frontal
    with pytest.raises(ValueError, match="data.views"):
        lm_data.read_sources(tiny_config(setup, "--config.data.views=lateral").data)


def test_compile_check_lowers_the_step_that_training_runs(setup, tmp_path, monkeypatch):
    """train() and lower_train_step (what compile-check compiles) lower to the same program: the same
    jax.jit, state and batch shardings, donation and batch dtypes (train's from a real packed batch)."""
    from llmcxr_jax import vocab

    seen = {}

    def stop_before_the_loop(run, state):
        seen.update(run=run, state=state)
        run.ckpt.close()
        return {}

    monkeypatch.setattr(lm, "_loop", stop_before_the_loop)
    text_size = vocab.text_size(vocab.load_tokenizer(setup["tokenizer"])[0])  # lower_train_step's vocabulary
    cfg = tiny_config(setup, "--config.train.mesh=2,2,2", "--config.train.grad_accum=2",
                      f"--config.model.text_size={text_size}")
    lm.train(cfg, str(tmp_path), echo=False)
    run = seen["run"]
    with jax.set_mesh(run.mesh):
        trained = run.step_fn.lower(seen["state"], lm.global_batch(next(run.data_iter), run.mesh)).as_text()
        checked = lm.lower_train_step(cfg, run.mesh).as_text()
    assert "tf.aliasing_output" in checked  # the state is donated (and the text names every argument's sharding)
    assert trained == checked
