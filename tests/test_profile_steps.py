"""train.profile_steps writes a jax.profiler trace of exactly the chosen steps; the loop reads the device only
at log / checkpoint / last steps, yet still names the first non-finite step and counts every step's tokens."""
import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from jax.profiler import ProfileData
from lm_run_helpers import make_setup, tiny_config

from llmcxr_jax import checkpoint, storage
from llmcxr_jax.errors import UsageError
from llmcxr_jax.train import lm, profiling
from llmcxr_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(str(tmp_path_factory.mktemp("profilesetup")), num_images=24)


def test_profile_steps_spec():
    assert profiling.parse_profile_steps("", 10) is None
    assert profiling.parse_profile_steps(" 3:5 ", 10) == profiling.StepRange(3, 5)
    assert profiling.parse_profile_steps("10:20", 10) == profiling.StepRange(10, 20)  # runs out with the run
    for bad in ("5", "a:b", "3:3", "5:2", "0:2", "2:", "1:2:3"):
        with pytest.raises(UsageError, match="train.profile_steps") as e:
            profiling.parse_profile_steps(bad, 10)
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="train.steps 10"):
        profiling.parse_profile_steps("11:12", 10)


def test_a_bucket_workdir_gets_the_trace_copied_in(tmp_path, monkeypatch):
    """gs:// workdirs: traced into a local folder, then copied through epath (a fake bucket in a local folder)."""
    bucket = tmp_path / "bucket"
    monkeypatch.chdir(tmp_path)

    def in_bucket(original, p, *args, **kwargs):
        p = os.fspath(p)
        return original(os.path.join(bucket, p[len("gs://"):]) if p.startswith("gs://") else p, *args, **kwargs)

    monkeypatch.setattr(storage, "require_packages", lambda scheme: None)
    profiler = profiling.StepProfiler(profiling.StepRange(2, 3), "gs://b/run", enabled=True)
    double = jax.jit(lambda x: 2 * x)
    with epath_testing.mock_epath(open=in_bucket, mkdir=in_bucket, makedirs=in_bucket, exists=in_bucket,
                                  isdir=in_bucket, stat=in_bucket):
        x = jnp.ones(4)
        for step in (1, 2, 3):
            profiler.before_step(step)
            assert profiler.active == (step == 2)  # "2:3" traces step 2 alone
            with profiler.annotate(step):
                x = double(x)
            profiler.after_step(step, x)
            assert not profiler.active
    assert profiler.done and not profiler.active and profiler._staging is None
    traces = glob.glob(str(bucket / "b" / "run" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert not os.path.exists(tmp_path / "gs:")  # nothing written as a local folder named like the bucket


def test_bad_profile_spec_fails_before_any_work(setup, tmp_path):
    with pytest.raises(UsageError, match="train.profile_steps '4-6'"):
        lm.train(tiny_config(setup, "--config.train.profile_steps=4-6"), str(tmp_path), echo=False)
    assert not os.path.exists(tmp_path / "checkpoints")


def _instrument(monkeypatch):
    """Record each step's metrics (device arrays, read after the run) and the step at each host read."""
    seen = {"metrics": [], "syncs": []}
    real_jit, real_sync = lm.jit_train_step, lm._sync

    def jit_train_step(*args, **kwargs):
        step = real_jit(*args, **kwargs)

        def fn(state, batch):
            state, metrics = step.fn(state, batch)
            seen["metrics"].append(metrics)
            return state, metrics

        return dataclasses.replace(step, fn=fn)

    def sync(run, unchecked, last_saved):
        seen["syncs"].append(unchecked[-1].step)
        return real_sync(run, unchecked, last_saved)

    monkeypatch.setattr(lm, "jit_train_step", jit_train_step)
    monkeypatch.setattr(lm, "_sync", sync)
    return seen


def test_profile_steps_trace_and_sparse_host_reads(setup, tmp_path, monkeypatch):
    seen = _instrument(monkeypatch)
    cfg = tiny_config(setup, "--config.train.steps=6", "--config.train.log_every=3", "--config.train.eval_every=0",
                      "--config.train.checkpoint_every=2", "--config.train.profile_steps=3:5",
                      "--config.data.seq_len=128", "--config.data.max_length=128")
    lm.train(cfg, str(tmp_path), echo=False)

    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
    host = ProfileData.from_file(traces[0]).find_plane_with_name("/host:CPU")
    events = [e for line in host.lines for e in line.events]
    marked = sorted(dict(e.stats)["step_num"] for e in events if e.name == profiling.STEP_NAME)
    assert marked == [3, 4]  # A:B is half-open
    launched = [dict(e.stats)["run_id"] for e in events
                if e.name == "CommonPjRtLoadedExecutable::Execute (jit_train_step)"]
    ops = [dict(e.stats) for e in events if dict(e.stats).get("hlo_module") == "jit_train_step"]  # device work
    assert len(set(launched)) == 2 and {o["run_id"] for o in ops} == set(launched)
    per_run = [sorted((o["device_ordinal"], o.get("hlo_op")) for o in ops if o["run_id"] == r) for r in launched]
    assert per_run[0] == per_run[1]  # step 4 ran to its end inside the trace, as step 3 did
    assert {o["device_ordinal"] for o in ops} == set(range(jax.device_count()))

    # the host read the device at log steps (1, 3, 6) and checkpoint steps (2, 4, 6) only
    assert seen["syncs"] == [1, 2, 3, 4, 6]
    tokens = [float(m["tokens"]) for m in seen["metrics"]]
    logged = {r["step"]: r for r in read_metrics(str(tmp_path / "metrics.jsonl"))}
    assert sorted(logged) == [1, 3, 6]
    for step, window in ((1, [1]), (3, [2, 3]), (6, [4, 5, 6])):  # tokens of every step, read at any sync
        r = logged[step]
        np.testing.assert_allclose(r["tokens_per_s"] * r["step_time_s"] * len(window),
                                   sum(tokens[s - 1] for s in window), rtol=1e-6)
        assert r["tokens"] == tokens[step - 1] and r["loss"] == float(seen["metrics"][step - 1]["loss"])


def test_non_finite_loss_names_its_first_step_between_host_reads(setup, tmp_path, monkeypatch):
    seen = _instrument(monkeypatch)
    batches = []
    real_global_batch = lm.global_batch
    monkeypatch.setattr(lm, "global_batch", lambda host, mesh: (batches.append(host["example_ids"].copy()),
                                                                real_global_batch(host, mesh))[1])
    real_jit = lm.jit_train_step

    def poisoned(*args, **kwargs):  # losses NaN from step 3 on, on the device; nothing reads them until step 4's save
        step = real_jit(*args, **kwargs)

        def fn(state, batch):
            state, metrics = step.fn(state, batch)
            if len(batches) >= 3:
                metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
            return state, metrics

        return dataclasses.replace(step, fn=fn)

    monkeypatch.setattr(lm, "jit_train_step", poisoned)
    runs = []
    real_loop = lm._loop
    monkeypatch.setattr(lm, "_loop", lambda run, state: (runs.append(run), real_loop(run, state))[1])
    cfg = tiny_config(setup, "--config.train.steps=8", "--config.train.log_every=5", "--config.train.eval_every=0",
                      "--config.train.checkpoint_every=2", "--config.data.seq_len=128",
                      "--config.data.max_length=128")
    with pytest.raises(lm.NonFiniteLoss) as e:
        lm.train(cfg, str(tmp_path), echo=False)
    assert seen["syncs"] == [1, 2, 4]
    message = str(e.value)
    assert message.startswith("loss is nan at step 3; ")
    run_pipe = runs[0].pipe
    assert f"batch examples {lm._describe(run_pipe, batches[2])[:8]}" in message
    assert lm._describe(run_pipe, batches[2]) != lm._describe(run_pipe, batches[3])
    assert message.endswith(os.path.join(str(tmp_path), "checkpoints", "2"))
    saved = checkpoint.TrainCheckpointer(str(tmp_path / "checkpoints"), keep=5)
    try:
        assert saved.latest_step() == 2
    finally:
        saved.close()

