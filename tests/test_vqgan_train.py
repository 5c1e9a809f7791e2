"""VQ-GAN training: the update runs sharded, the adaptive weight is finite, resume is exact."""
import json
import os
import shutil
import subprocess
import sys

import integrity_helpers
import jax
import numpy as np
import pytest
from board_helpers import hparam_metrics, hparams, read_board
from flax import nnx
from kill_worker import kill_when_frozen

from llmcxr_jax import checkpoint, configs
from llmcxr_jax.train import vqgan as train_vqgan
from llmcxr_jax.train.metrics import read_metrics

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "vqgan_f16_1024.py")


# A two-level VQ-GAN at 16 px (8x8 codes), GAN on from step 2, every step logged (the SIGKILL test passes it as flags).
OVERRIDES = {"model.resolution": 16, "model.ch_mult": (1, 2), "model.attn_resolutions": (8,),
             "discriminator.n_layers": 1, "train.steps": 4, "train.batch_size": 8,
             "train.disc_start": 2, "train.log_every": 1, "train.eval_every": 2, "train.grid_images": 2,
             "train.checkpoint_every": 2, "train.reseed_every": 3, "train.ema_decay": 0.9}


def small(**overrides):
    """The OVERRIDES config, with these overrides on top."""
    base = {**OVERRIDES, **overrides}
    cfg = configs.load_config(f"{CONFIG}:tiny")
    for key, value in base.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def _same(tree_a, tree_b):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tree_a, tree_b)


def _equal(tree_a, tree_b) -> bool:
    return all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 4-step run: (final state, its workdir)."""
    workdir = tmp_path_factory.mktemp("straight")
    return train_vqgan.train(small(), str(workdir), echo=False), workdir


def test_training_steps_are_finite_and_write_records(straight):
    state, tmp_path = straight
    everything = read_metrics(str(tmp_path / "metrics.jsonl"))
    evals = [r for r in everything if "eval_l1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(np.isfinite(r["eval_l1"]) for r in evals)
    records = [r for r in everything if "eval_l1" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # log_every 1
    for r in records:
        assert all(np.isfinite(v) for v in r.values()), r
    assert records[0]["disc_factor"] == 0 and records[-1]["disc_factor"] == 1  # the GAN switches on at 2
    assert records[-1]["d_weight"] > 0 and records[-1]["g_grad_norm"] > 0
    # reseed_every 3: only step 3 reseeds, the codes none of steps 1-3 used (exact rule: test_vqgan_loss_parity)
    n_embed = small().model.n_embed
    used = [round(r["codes_used"] * n_embed) for r in records[:3]]
    assert [records[k]["reseeded_codes"] for k in (0, 1, 3)] == [0, 0, 0]
    assert n_embed - sum(used) <= records[2]["reseeded_codes"] <= n_embed - max(used)
    assert int(state["step"]) == 4
    assert os.path.isfile(tmp_path / "images" / "reconstructions_0000004.png")
    assert os.path.isdir(tmp_path / "vqgan")  # the trained tokenizer, ready for encode-images
    assert json.load(open(tmp_path / "config.json"))["model"]["resolution"] == 16
    # TensorBoard's reader: every logged metric, the reconstruction grids (2 inputs over their reconstructions)
    acc = read_board(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {k for r in everything for k in r} - {"step"}
    assert [e.step for e in acc.Scalars("total_loss")] == [1, 2, 3, 4]
    assert [(e.step, e.value) for e in acc.Scalars("eval_l1")] == [(r["step"], pytest.approx(r["eval_l1"]))
                                                                   for r in evals]
    assert [(e.step, e.height, e.width) for e in acc.Images("reconstructions")] == [(s, 32, 32) for s in (0, 2, 4)]
    assert hparams(acc)["model.resolution"] == 16 and hparam_metrics(acc) == ["eval_l1", "eval_psnr"]


def test_a_training_checkpoint_loads_as_a_vqgan(straight, tmp_path):
    """`--vqgan WORKDIR/checkpoints` (any train-vqgan step, not only the finished WORKDIR/vqgan) gives its
    EMA weights, or the generator's in a run without EMA; a checkpoint missing a parameter, or holding
    no weights at all, is a one-line error (orbax's partial restore would leave abstract arrays)."""
    from llmcxr_jax import checkpoint, sharding

    state, workdir = straight
    mesh = sharding.make_mesh("-1,1,1")
    model, meta = checkpoint.load_vqgan(str(workdir / "checkpoints"), mesh)
    assert not _equal(state["ema"], state["gen"])
    _same(nnx.state(model, nnx.Param).to_pure_dict(), state["ema"])
    finished, _ = checkpoint.load_vqgan(str(workdir / "vqgan"), mesh)
    _same(nnx.state(finished, nnx.Param).to_pure_dict(), state["ema"])

    def save(name, tree):
        ckpt = checkpoint.TrainCheckpointer(str(tmp_path / name), keep=1)
        ckpt.save(4, tree, {}, {"vqgan_config": meta["vqgan_config"]})
        ckpt.close()
        return str(tmp_path / name)

    no_ema = save("no_ema", {"gen": state["gen"], "ema": {}, "step": state["step"]})
    _same(nnx.state(checkpoint.load_vqgan(no_ema, mesh)[0], nnx.Param).to_pure_dict(), state["gen"])
    partial = save("partial", {"params": {k: v for k, v in state["gen"].items() if k != "quant_conv"}})
    with pytest.raises(ValueError, match=r"lacks 2 of this model's parameters under 'params' \(first \['quant_conv'\]"):
        checkpoint.load_vqgan(partial, mesh)
    with pytest.raises(ValueError, match=r"holds no 'params' weights \(its state has step, usage\)"):
        checkpoint.load_vqgan(save("bare", {"step": state["step"], "usage": state["usage"]}), mesh)


def test_a_workdir_stands_for_its_model_and_other_directories_say_what_to_give(straight, tmp_path):
    """A train-vqgan workdir loads its finished vqgan/ (else its latest checkpoints/ step). A Hugging
    Face or diffusers model directory, or anything else, given where a checkpoint belongs: the one-line
    error names the command that converts it, or what to pass."""
    from llmcxr_jax import checkpoint, sharding

    mesh = sharding.make_mesh("-1,1,1")
    state, workdir = straight
    assert checkpoint.model_dir(str(workdir), "vqgan") == str(workdir / "vqgan")
    assert checkpoint.model_dir(str(workdir), "lm") == str(workdir / "checkpoints")
    _same(nnx.state(checkpoint.load_vqgan(str(workdir), mesh)[0], nnx.Param).to_pure_dict(), state["ema"])
    with pytest.raises(ValueError, match="checkpoints is not a language-model checkpoint"):
        checkpoint.load_lm(str(workdir), mesh)
    for name, config, hint in (("hf", {"model_type": "gpt_neox"}, "import-hf --hf"),
                               ("dvq", {"_class_name": "VQModel"}, "import-vqgan --diffusers"),
                               ("other", ["not", "a", "config"], "give a directory written by `llmcxr import-hf`")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / name} holds no orbax checkpoint; .*{hint}"):
            checkpoint.load_lm(str(tmp_path / name), mesh)


ROOT = os.path.join(os.path.dirname(__file__), "..")


def _steps(records):
    return {r["step"]: r for r in records if "l1" in r}  # the training records (not the evaluations)


def _kill_at_step_3(workdir: str, timeout: float = 300) -> None:
    marker = os.path.join(workdir, "frozen")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
               KILL_PAUSE_AT_LOG="3", KILL_MARKER=marker)
    args = [sys.executable, os.path.join(os.path.dirname(__file__), "kill_worker.py"), "train-vqgan",
            "--config", f"{CONFIG}:tiny", "--workdir", workdir, *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when_frozen(proc, marker, lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "2")), "train-vqgan",
                     timeout)


def test_sigkill_then_resume_replays_a_reseed_and_equals_an_uninterrupted_run(straight, tmp_path):
    """`llmcxr train-vqgan` in a subprocess, SIGKILLed at step 3 (its step-2 checkpoint committed;
    tests/kill_worker.py freezes it there): the resume restores step 2 and replays step 3 (a codebook
    reseed, reseed_every 3) and step 4, EMA updates included; losses and the whole state (generator,
    EMA, discriminator, statistics, optimizers, usage) equal the uninterrupted run bit for bit."""
    straight, straight_dir = straight
    straight_steps = _steps(read_metrics(str(straight_dir / "metrics.jsonl")))
    workdir = str(tmp_path / "killed")
    _kill_at_step_3(workdir)
    before = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert max(_steps(before)) == 3
    saved = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=5)
    try:
        assert saved.latest_step() == 2  # older than the step the child had reached
    finally:
        saved.close()
    resumed = train_vqgan.train(small(), workdir, echo=False)
    replayed = _steps(read_metrics(os.path.join(workdir, "metrics.jsonl"))[len(before):])
    assert sorted(replayed) == [3, 4]  # step 3 (the reseed) ran again
    assert replayed == {s: straight_steps[s] for s in replayed}
    assert _steps(before) == {s: straight_steps[s] for s in _steps(before)}
    # TensorBoard: the killed attempt's file and the resumed one's read as one run, each step once
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2
    assert [(e.step, e.value) for e in read_board(os.path.join(workdir, "tensorboard")).Scalars("total_loss")] == [
        (s, pytest.approx(straight_steps[s]["total_loss"])) for s in (1, 2, 3, 4)]
    assert int(resumed["step"]) == 4 and set(resumed) == set(straight)
    for key in straight:  # gen, ema, disc, disc_stats, opt_g, opt_d, usage, step
        assert jax.tree.structure(straight[key]) == jax.tree.structure(resumed[key]), key
        for a, b in zip(jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)


def test_resume_past_a_damaged_newest_step_equals_an_uninterrupted_run(straight, tmp_path, capsys):
    """A copy of the uninterrupted run whose newest checkpoint (step 4) has one byte flipped where orbax still
    reads it: rerunning warns once, moves step 4 to checkpoints/4.damaged/ (kept), resumes from step 2, and
    steps 3-4 give the uninterrupted run's losses and whole state bit for bit."""
    straight, straight_dir = straight
    straight_steps = _steps(read_metrics(str(straight_dir / "metrics.jsonl")))
    workdir = tmp_path / "copied"
    shutil.copytree(straight_dir, workdir)
    integrity_helpers.flip_silently(str(workdir / "checkpoints" / "4"))
    before = len(read_metrics(str(workdir / "metrics.jsonl")))
    capsys.readouterr()
    resumed = train_vqgan.train(small(), str(workdir), echo=False)
    warned = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and "checkpoint step 4 in" in warned[0] and "resuming from step 2" in warned[0], warned
    assert (workdir / "checkpoints" / "4.damaged").is_dir() and (workdir / "checkpoints" / "4").is_dir()
    replayed = _steps(read_metrics(str(workdir / "metrics.jsonl"))[before:])
    assert replayed == {s: straight_steps[s] for s in (3, 4)}
    for key in straight:
        for a, b in zip(jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)


@pytest.mark.slow  # ~60 s; tests/test_vqgan_reseed.py checks a GAN-off step leaves the discriminator untouched
def test_without_the_gan_the_discriminator_never_runs(tmp_path):
    """disc_factor 0: the generator follows the same path as a run whose GAN starts later (the GAN
    terms weigh 0 until then), while the discriminator, its statistics and its Adam state stay put."""
    no_reseed = {"train.reseed_every": 0, "train.steps": 2, "train.ema_decay": 0.0, "train.eval_every": 0}
    later = train_vqgan.train(small(**no_reseed, **{"train.disc_start": 100}), str(tmp_path / "a"), echo=False)
    off = train_vqgan.train(small(**no_reseed, **{"train.disc_factor": 0.0}), str(tmp_path / "b"), echo=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 later["gen"], off["gen"])
    _, fresh = train_vqgan.init_state(small())
    for key in ("disc", "disc_stats", "opt_d"):
        _same(off[key], fresh[key])
    assert not _equal(later["disc_stats"], fresh["disc_stats"])  # taming's warm-up: BatchNorm tracks batches
    records = [r for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl")) if "l1" in r]
    assert records and not any(k.startswith(("d_", "g_loss", "logits")) for r in records for k in r)
    # dead codes are still reseeded without the GAN
    train_vqgan.train(small(**{"train.disc_factor": 0.0, "train.reseed_every": 1, "train.steps": 2,
                               "train.eval_every": 0}), str(tmp_path / "c"), echo=False)
    records = [r for r in read_metrics(str(tmp_path / "c" / "metrics.jsonl")) if "reseeded_codes" in r]
    assert sum(r["reseeded_codes"] for r in records) > 0


def test_bad_configs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="batch_size 6 does not divide over 8 data-parallel devices"):
        train_vqgan.train(small(**{"train.batch_size": 6}), str(tmp_path / "a"), echo=False)
    with pytest.raises(ValueError, match="need train.lpips_weights"):
        train_vqgan.train(small(**{"train.perceptual_weight": 1.0}), str(tmp_path / "b"), echo=False)
    train_vqgan.train(small(**{"train.steps": 1}), str(tmp_path / "c"), echo=False)
    with pytest.raises(ValueError, match="holds a run with a different model"):
        train_vqgan.train(small(**{"model.ch": 64}), str(tmp_path / "c"), echo=False)


def test_init_from_a_taming_ckpt_or_an_orbax_vqgan(tmp_path):
    """Fine-tuning starts from the given weights (generator, and the discriminator a taming .ckpt
    carries); with a zero step size the run ends where it started. Mismatches fail before training."""
    from llmcxr_jax import checkpoint, sharding
    from llmcxr_jax.convert import taming_vqgan
    from llmcxr_jax.models import discriminator as disc_lib
    from llmcxr_jax.models.discriminator import DiscriminatorConfig
    from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan

    base = small()
    source = init_vqgan(VQGANConfig(**base.model), seed=11)
    disc = disc_lib.init_discriminator(DiscriminatorConfig(**base.discriminator), seed=12)
    for path, var in nnx.to_flat_state(nnx.state(disc, nnx.BatchStat)):
        if path[-1] == "num_batches_tracked":
            var.set_value(var.get_value() + 1000)  # a discriminator that has trained
    ckpt = str(tmp_path / "source.ckpt")
    taming_vqgan.write_ckpt(source, ckpt, extra=disc_lib.to_taming_state_dict(disc))
    frozen = {"train.learning_rate": 0.0, "train.reseed_every": 0, "train.steps": 1, "train.disc_start": 5}
    state = train_vqgan.train(small(**frozen, **{"train.init_from": ckpt}), str(tmp_path / "a"), echo=False)
    want = nnx.state(source, nnx.Param).to_pure_dict()
    _same(state["gen"], want)
    _same(state["ema"], want)
    _, disc_params, _ = nnx.split(disc, nnx.Param, nnx.BatchStat)
    _same(state["disc"], disc_params.to_pure_dict())
    counts = [int(v) for p, v in jax.tree_util.tree_leaves_with_path(state["disc_stats"])
              if "num_batches_tracked" in jax.tree_util.keystr(p)]
    assert counts and all(1000 < c < 1010 for c in counts)  # its running statistics went on from the file's
    # an orbax VQ-GAN (import-vqgan's output) gives the generator; the discriminator starts fresh
    orbax_dir = str(tmp_path / "imported")
    checkpoint.save_vqgan(orbax_dir, source)
    state = train_vqgan.train(small(**frozen, **{"train.init_from": orbax_dir}), str(tmp_path / "b"), echo=False)
    _same(state["gen"], want)
    exported, _ = checkpoint.load_vqgan(str(tmp_path / "b" / "vqgan"), sharding.make_mesh("-1,1,1"))
    np.testing.assert_array_equal(np.asarray(exported.quantize.embedding.get_value()),
                                  np.asarray(source.quantize.embedding.get_value()))
    with pytest.raises(ValueError, match=r"train.init_from .* is a VQ-GAN with ch=32, the config says 64"):
        train_vqgan.train(small(**frozen, **{"train.init_from": orbax_dir, "model.ch": 64}), str(tmp_path / "c"),
                          echo=False)
    with pytest.raises(ValueError, match="does not fit the config's model / discriminator"):
        train_vqgan.train(small(**frozen, **{"train.init_from": ckpt, "discriminator.ndf": 32}), str(tmp_path / "d"),
                          echo=False)
    with pytest.raises(FileNotFoundError, match="train.init_from /nowhere/x.ckpt does not exist"):
        train_vqgan.train(small(**{"train.init_from": "/nowhere/x.ckpt"}), str(tmp_path / "e"), echo=False)
    assert not any(os.path.exists(tmp_path / d) for d in "cde")  # refused before the workdir was claimed


@pytest.mark.slow
def test_tiny_training_halves_the_reconstruction_error(tmp_path):
    """On the synthetic CXR corpus (train split trains, validate/test images are held out)."""
    from llmcxr_jax import synthetic

    root = str(tmp_path / "corpus")
    synthetic.synthesize(root, num_images=600, image_size=64, seed=0)
    cfg = configs.load_config(f"{CONFIG}:tiny", ["--config.train.steps=150", "--config.train.eval_every=50",
                                                 f"--config.train.data={root}"])
    train_vqgan.train(cfg, str(tmp_path / "run"), echo=False)
    evals = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "eval_l1" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == cfg.train.steps
    assert evals[-1]["eval_l1"] <= 0.5 * evals[0]["eval_l1"], [(r["step"], r["eval_l1"]) for r in evals]


@pytest.mark.slow  # the CLI is a thin wrapper; resume is proven by test_sigkill_then_resume_replays_a_reseed_...
def test_cli_trains_and_resumes(tmp_path, capsys):
    from llmcxr_jax import cli

    args = ["train-vqgan", "--config", f"{CONFIG}:tiny", "--workdir", str(tmp_path),
            "--config.model.resolution=16", "--config.model.ch_mult=(1,2)", "--config.model.attn_resolutions=(8,)",
            "--config.discriminator.n_layers=1", "--config.train.disc_start=2", "--config.train.reseed_every=3",
            "--config.train.ema_decay=0.9", "--config.train.log_every=1", "--config.train.eval_every=2",
            "--config.train.grid_images=2", "--config.train.checkpoint_every=2"]
    assert cli.main(args + ["--config.train.steps=2"]) == 0
    assert cli.main(args + ["--config.train.steps=3"]) == 0  # picks up at step 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 3
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "l1" in r] == [1, 2, 3]


@pytest.mark.slow  # as its CIP twin below; LPIPS parity itself is proven in tests/test_perceptual.py
def test_perceptual_term_trains_with_a_frozen_lpips(tmp_path):
    """LPIPS (random weights here; converted VGG16 + lin heads in real runs) joins the nll."""
    from llmcxr_jax.models import perceptual

    lpips = perceptual.LPIPS(perceptual.LPIPSConfig(dtype="float32", param_dtype="float32"), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(lpips).to_pure_dict())
    train_vqgan.train(small(**{"train.perceptual_weight": 1.0, "train.steps": 2, "train.reseed_every": 0}),
                      str(tmp_path), lpips_model=lpips, echo=False)
    records = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "eval_l1" not in r]
    assert all(np.isfinite(r["perceptual"]) and r["perceptual"] > 0 for r in records)
    assert all(r["nll_loss"] > r["l1"] for r in records)  # L1 + perceptual
    after = nnx.state(lpips).to_pure_dict()
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))  # frozen


@pytest.mark.slow
def test_cip_term_trains_with_a_frozen_densenet(tmp_path):
    from llmcxr_jax.models import perceptual

    cfg = perceptual.txv_densenet121(dtype="float32", param_dtype="float32")
    densenet = perceptual.DenseNet(cfg, rngs=nnx.Rngs(0))
    train_vqgan.train(small(**{"train.cip_weight": 100.0, "train.steps": 2, "train.reseed_every": 0}),
                      str(tmp_path), cip_model=densenet, echo=False)
    records = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "eval_l1" not in r]
    assert all(np.isfinite(r["cip_loss"]) and r["cip_loss"] > 0 for r in records)
