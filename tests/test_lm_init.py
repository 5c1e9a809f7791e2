"""Where a run starts: a HF GPT-NeoX directory, another run (stage 2 from stage 1), resume_from;
and the optimizer's schedules and freeze masks."""
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from lm_run_helpers import make_setup, tiny_config

from llmcxr_jax import checkpoint, vocab
from llmcxr_jax.train import lm, optim
from llmcxr_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("initsetup")))


def _params(workdir):
    loaded = checkpoint.load_lm(os.path.join(workdir, "checkpoints"), jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")))
    return jax.tree.map(np.asarray, nnx.state(loaded.model, nnx.Param).to_pure_dict())


def test_init_from_a_hf_directory(setup, tmp_path):
    from hf_helpers import make_hf_model

    tok, _, _ = vocab.load_tokenizer(setup["tokenizer"])
    hf_dir = str(tmp_path / "hf")
    model = make_hf_model(hf_dir, vocab.text_size(tok), hidden=64, layers=2, heads=4)
    for name in os.listdir(setup["tokenizer"]):
        shutil.copy(os.path.join(setup["tokenizer"], name), hf_dir)
    cfg = tiny_config(setup, f"--config.train.init_from={hf_dir}", "--config.data.tokenizer=",
                      "--config.train.steps=2", "--config.train.eval_every=0", "--config.train.image_rows_only=True")
    out = lm.train(cfg, str(tmp_path / "run"), echo=False)
    assert out["source"] == f"hf:{hf_dir}"
    params = _params(str(tmp_path / "run"))
    hf_rows = model.gpt_neox.embed_in.weight.detach().numpy()
    np.testing.assert_array_equal(params["embed_in"]["embedding"][:hf_rows.shape[0]], hf_rows)


def test_stage2_starts_from_stage1(setup, tmp_path):
    lm.train(tiny_config(setup, "--config.train.steps=2", "--config.train.eval_every=0"), str(tmp_path / "s1"),
             echo=False)
    cfg = tiny_config(setup, f"--config.train.init_from={tmp_path / 's1'}", "--config.data.tokenizer=",
                      "--config.train.steps=1", "--config.train.eval_every=0", "--config.train.learning_rate=0.0",
                      stage=2)
    out = lm.train(cfg, str(tmp_path / "s2"), echo=False)
    assert out["source"] == f"checkpoint:{tmp_path / 's1'}"
    a, b = _params(str(tmp_path / "s1")), _params(str(tmp_path / "s2"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # learning rate 0: stage 2 holds stage 1's weights
    assert checkpoint.read_metadata(str(tmp_path / "s2" / "checkpoints"))["stage"] == 2


def test_resume_from_another_workdir_continues_the_run(setup, tmp_path):
    common = ["--config.train.eval_every=0", "--config.train.log_every=1"]
    lm.train(tiny_config(setup, "--config.train.steps=5", *common), str(tmp_path / "straight"), echo=False)
    lm.train(tiny_config(setup, "--config.train.steps=3", *common), str(tmp_path / "first"), echo=False)
    lm.train(tiny_config(setup, "--config.train.steps=5", f"--config.train.resume_from={tmp_path / 'first'}",
                         *common), str(tmp_path / "second"), echo=False)
    assert [r["step"] for r in read_metrics(str(tmp_path / "second" / "metrics.jsonl")) if "loss" in r] == [4, 5]
    a, b = _params(str(tmp_path / "straight")), _params(str(tmp_path / "second"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _train_cfg(**kw):
    t = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=4, steps=14, schedule="constant",
                                       final_lr_ratio=0.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
                                       weight_decay=0.0, grad_clip=1.0, freeze="", image_rows_only=False))
    t.update(kw)
    return t


def test_learning_rate_schedules():
    lr = optim.learning_rate(_train_cfg())
    np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 10)], [0.0, 0.5, 1.0, 1.0])
    cos = optim.learning_rate(_train_cfg(schedule="cosine", final_lr_ratio=0.1))
    np.testing.assert_allclose([float(cos(s)) for s in (4, 9, 14)], [1.0, 0.55, 0.1], rtol=1e-6)
    lin = optim.learning_rate(_train_cfg(schedule="linear"))
    np.testing.assert_allclose([float(lin(s)) for s in (4, 9, 14)], [1.0, 0.5, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rate(_train_cfg(schedule="step"))


def test_freeze_regex_holds_matching_parameters():
    params = {"layers": {"0": {"mlp": {"kernel": jnp.ones((2, 2))}}, "1": {"mlp": {"kernel": jnp.ones((2, 2))}}}}
    tx = optim.make_optimizer(_train_cfg(freeze="layers/0/", warmup_steps=0), params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(updates["layers"]["0"]["mlp"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"]["1"]["mlp"]["kernel"]).max()) > 0.0
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.make_optimizer(_train_cfg(freeze="nothing_named_this"), params)


def test_a_checkpoint_whose_tokenizer_disagrees_with_its_layout_is_refused(setup, tmp_path, capsys):
    """Resuming the run, continuing it elsewhere (resume_from) and starting from it (init_from) all read
    its metadata through checkpoint.read_lm_metadata, which checks the tokenizer against the layout."""
    from lm_run_helpers import STAGE1

    from llmcxr_jax import cli

    run = tmp_path / "run"
    lm.train(tiny_config(setup, "--config.train.steps=1", "--config.train.eval_every=0"), str(run), echo=False)
    tok_dir = str(run / "checkpoints" / checkpoint.TOKENIZER_DIR)
    tok, _, tok_cfg = vocab.load_tokenizer(tok_dir)
    size = vocab.text_size(tok)
    assert checkpoint.read_metadata(str(run / "checkpoints"))["vocab"]["text_size"] == size
    tok.add_tokens(["<|not-in-the-layout|>"])
    vocab.save_tokenizer(tok, tok_cfg, tok_dir)
    base = ["train", "--config", f"{STAGE1}:tiny", f"--config.data.root={setup['root']}",
            f"--config.data.codes={setup['codes']}", f"--config.data.tokenizer={setup['tokenizer']}",
            "--config.model.image_codes=64", "--config.data.dolly_eval_rows=20", "--config.train.steps=2",
            "--config.train.eval_every=0"]
    for workdir, start in ((run, []), (tmp_path / "resumed", [f"--config.train.resume_from={run}"]),
                           (tmp_path / "init", [f"--config.train.init_from={run}"])):
        assert cli.main([*base, "--workdir", str(workdir), *start]) == 2, start
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"has {size + 1} tokens" in err and f"T = {size}" in err, err
        assert f"tokenizer in {tok_dir} " in err, err  # refused when the checkpoint is read, not by a later stage
