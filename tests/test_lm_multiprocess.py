"""Two JAX processes on localhost (gloo CPU collectives, 2 devices each) train the tiny LM as two
slices (train.num_slices=2: each process is a slice, the data axis spans both) to the same parameters
as one process with 4 devices in one slice, given the same logical data shards; SIGTERM to one of
them stops both at the same step with one checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from board_helpers import hparams, read_board
from flax import nnx
from lm_run_helpers import STAGE1, make_setup
from tensorboard.backend.event_processing import event_file_loader

from llmcxr_jax import checkpoint

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _args(setup, workdir, steps=4):
    return [sys.executable, "-m", "llmcxr_jax.cli", "train", "--config", f"{STAGE1}:tiny", "--workdir", workdir,
            f"--config.data.root={setup['root']}", f"--config.data.codes={setup['codes']}",
            f"--config.data.tokenizer={setup['tokenizer']}", "--config.model.image_codes=64",
            "--config.data.dolly_eval_rows=20", "--config.data.num_shards=2", "--config.train.mesh=-1,1,1",
            f"--config.train.steps={steps}", "--config.train.eval_every=0", "--config.train.log_every=1"]


def _env(devices, **extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_DEFAULT_MATMUL_PRECISION="highest", **extra)


def _params(ckpt_dir):
    loaded = checkpoint.load_lm(ckpt_dir, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                                                            ("data", "fsdp", "tensor")))
    return jax.tree.map(np.asarray, nnx.state(loaded.model, nnx.Param).to_pure_dict())


def test_two_processes_equal_one(tmp_path):
    """The two processes start through launch/local_multiprocess.sh, so this also shows the launcher
    training the tiny config on two processes. They run as two slices (sharding.make_mesh's hybrid
    mesh, as a multi-slice TPU job): the equal parameters show the data axis crossing the processes
    trains like one slice."""
    setup = make_setup(str(tmp_path / "setup"))
    multi = str(tmp_path / "multi")
    launcher = os.path.join(ROOT, "launch", "local_multiprocess.sh")
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # the venv's `llmcxr`
    procs = [subprocess.Popen(["bash", launcher, "2", *_args(setup, multi)[4:], "--config.train.num_slices=2"],
                              env=_env(2, PATH=path, LLMCXR_DEVICES_PER_PROCESS="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    single = subprocess.Popen(_args(setup, str(tmp_path / "single")), env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    for p in procs + [single]:
        try:
            out, err = p.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            for q in procs + [single]:
                q.kill()
            pytest.fail("a training process hung")
        logs = os.path.join(multi, "logs")
        detail = "".join(open(os.path.join(logs, f)).read()[-1500:] for f in sorted(os.listdir(logs))) \
            if p is procs[0] and os.path.isdir(logs) else ""
        assert p.returncode == 0, err[-3000:] + detail
        if p is single:
            out_single = out
    assert sorted(os.listdir(os.path.join(multi, "logs"))) == ["process_0.log", "process_1.log"]
    for i in range(2):  # each process ran to the end in one JAX cluster of 2 processes over a 4-device mesh
        summary = [json.loads(line) for line in open(os.path.join(multi, "logs", f"process_{i}.log"))
                   if line.startswith("{") and '"checkpoints"' in line]
        assert [(s["step"], s["processes"], s["devices"]) for s in summary] == [(4, 2, 4)], i
    single_summary = json.loads(out_single.strip().splitlines()[-1])
    assert (single_summary["processes"], single_summary["devices"]) == (1, 4)
    # the whole mesh is the data axis (4 = 2 slices x 2 devices), so it spans both processes
    assert checkpoint.read_metadata(os.path.join(multi, "checkpoints"))["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    a, b = _params(os.path.join(multi, "checkpoints")), _params(str(tmp_path / "single" / "checkpoints"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        # gloo sums the gradient shards in another order than one process: equal to float rounding
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    with open(os.path.join(multi, "metrics.jsonl")) as f:  # process 0 logs alone: each step once
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2, 3, 4]
    boards = os.listdir(os.path.join(multi, "tensorboard"))
    assert len(boards) == 1, boards  # one event file, not one per process
    events = list(event_file_loader.EventFileLoader(os.path.join(multi, "tensorboard", boards[0])).Load())
    headers = [e for e in events if e.file_version]
    assert len(headers) == 1, f"{len(headers)} TensorBoard writers wrote this file, not process 0's alone"
    acc = read_board(os.path.join(multi, "tensorboard"))  # TensorBoard's reader: each step once
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert hparams(acc)["train.steps"] == 4


@pytest.mark.slow  # the stop agreement itself is proven (fast) in tests/test_preemption.py
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    """Only process 0 is signalled: both must save the same step (a save that one process skips hangs the
    other in the collective) and exit 0 with "preempted": true."""
    setup = make_setup(str(tmp_path / "setup"), num_images=24)
    port = portpicker.pick_unused_port()
    workdir = str(tmp_path / "run")
    args = _args(setup, workdir, steps=500) + ["--config.train.checkpoint_every=1000"]
    procs = [subprocess.Popen(args, env=_env(2, LLMCXR_COORDINATOR=f"localhost:{port}", LLMCXR_NUM_PROCESSES="2",
                                             LLMCXR_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 240
        while not (os.path.isfile(metrics) and '"loss"' in open(metrics).read()):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no training step logged"
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    except (subprocess.TimeoutExpired, AssertionError):
        for p in procs:
            p.kill()
        raise
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(s["preempted"] for s in summaries) and summaries[0]["step"] == summaries[1]["step"] < 500
    saved = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=5)
    try:
        assert saved.manager.all_steps() == [summaries[0]["step"]]
    finally:
        saved.close()
