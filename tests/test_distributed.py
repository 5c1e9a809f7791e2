"""Multi-process start-up: environment parsing without JAX, and a real 2-process CPU job over gloo
that must train a tiny GPT-NeoX to the same parameters as one process over the same 4 devices."""
import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from llmcxr_jax import distributed
from llmcxr_jax.distributed import DistributedPlan, expand_nodelist, resolve_distributed

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")

SLURM = {"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_JOB_NODELIST": "gpu[01-09]",
         "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}


@pytest.mark.parametrize("nodelist,hosts", [
    ("node17", ["node17"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10]-ib,login3", ["gpu8-ib", "gpu9-ib", "gpu10-ib", "login3"]),
    ("a[098-100],b[1,3]", ["a098", "a099", "a100", "b1", "b3"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_nothing_set_or_one_process_is_single():
    assert resolve_distributed({}) == DistributedPlan("single")
    assert resolve_distributed({"LLMCXR_NUM_PROCESSES": "1"}).mode == "single"
    assert resolve_distributed({**SLURM, "SLURM_NTASKS": "1"}).mode == "single"
    assert resolve_distributed({"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"
    assert resolve_distributed({**SLURM, "LLMCXR_DISTRIBUTED": "off"}).mode == "single"


def test_explicit_environment_and_arguments():
    env = {"LLMCXR_COORDINATOR": "10.0.0.1:999", "LLMCXR_NUM_PROCESSES": "4", "LLMCXR_PROCESS_ID": "3"}
    assert resolve_distributed(env) == DistributedPlan("explicit", "10.0.0.1:999", 4, 3)
    # LLMCXR_* wins over SLURM; arguments win over both, field by field
    assert resolve_distributed({**SLURM, **env}).coordinator == "10.0.0.1:999"
    assert resolve_distributed({**SLURM, **env}, process_id=0, local_device_ids=2) == DistributedPlan(
        "explicit", "10.0.0.1:999", 4, 0, (2,))
    assert resolve_distributed({}, "host", 2, 1, [0, 1]) == DistributedPlan(
        "explicit", "host:12355", 2, 1, (0, 1))
    assert resolve_distributed({"LLMCXR_COORDINATOR": "h", "LLMCXR_COORDINATOR_PORT": "7", "LLMCXR_NUM_PROCESSES": "2",
                                "LLMCXR_PROCESS_ID": "0", "LLMCXR_LOCAL_DEVICE_IDS": "2,3"}) == DistributedPlan(
        "explicit", "h:7", 2, 0, (2, 3))


@pytest.mark.parametrize("env,kwargs,message", [
    ({"LLMCXR_COORDINATOR": "h:1", "LLMCXR_NUM_PROCESSES": "2", "LLMCXR_PROCESS_ID": "2"}, {},
     r"process id 2 is outside \[0, 2\); give each process a distinct id"),
    ({}, {"num_processes": 4, "process_id": -1, "coordinator_address": "h:1"}, r"process id -1 is outside \[0, 4\)"),
    ({"LLMCXR_NUM_PROCESSES": "2"}, {}, r"missing the coordinator address \(LLMCXR_COORDINATOR=host:port\), "
                                        r"process id \(LLMCXR_PROCESS_ID\)"),
    ({"LLMCXR_NUM_PROCESSES": "two"}, {}, "LLMCXR_NUM_PROCESSES='two' is not an integer"),
    ({"LLMCXR_DISTRIBUTED": "maybe"}, {}, "must be one of off, tpu, auto"),
    ({"LLMCXR_LOCAL_DEVICE_IDS": "0;1", "LLMCXR_NUM_PROCESSES": "2"}, {}, "must be comma-separated device ids"),
])
def test_bad_settings_are_one_line_errors(env, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_distributed(env, **kwargs)
    assert "\n" not in str(err.value)


def test_slurm():
    port = 61440 + 1234 % 4096
    plan = resolve_distributed(SLURM)
    # first host of the step's node list; 4 tasks on this node -> one GPU each, by local id
    assert plan == DistributedPlan("slurm", f"gpu03:{port}", 8, 5, (1,))
    assert resolve_distributed({**SLURM, "LLMCXR_COORDINATOR_PORT": "4000"}).coordinator == "gpu03:4000"
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert resolve_distributed(no_step).coordinator == f"gpu01:{port}"
    # one task per node sees all its GPUs; so does a task SLURM already bound to one GPU
    one_per_node = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x8)"}
    assert resolve_distributed(one_per_node).local_device_ids is None
    assert resolve_distributed({**SLURM, "CUDA_VISIBLE_DEVICES": "1"}).local_device_ids is None
    assert resolve_distributed({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "4,1", "SLURM_NODEID": "1"}
                               ).local_device_ids is None


def test_tpu_pod_is_left_to_jax():
    for env in ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080"},
                {"CLOUD_TPU_TASK_ID": "1"}, {"LLMCXR_DISTRIBUTED": "tpu"}):
        assert resolve_distributed(env) == DistributedPlan("tpu"), env
    assert resolve_distributed({"TPU_WORKER_HOSTNAMES": "t0,t1"}, process_id=1) == DistributedPlan(
        "tpu", process_id=1)


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "_DONE", None)
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    return calls


def test_initialize_single_process_does_nothing_and_is_idempotent(fake_jax_distributed):
    first = distributed.initialize_distributed(env={})
    assert first == {"mode": "single", "coordinator": None, "num_processes": 1, "process_id": 0,
                     "local_device_ids": None}
    assert distributed.initialize_distributed(env={"LLMCXR_COORDINATOR": "h:1", "LLMCXR_NUM_PROCESSES": "2",
                                                   "LLMCXR_PROCESS_ID": "1"}) is first
    assert fake_jax_distributed == []


def test_initialize_explicit_once(fake_jax_distributed):
    env = {"LLMCXR_COORDINATOR": "h:1", "LLMCXR_NUM_PROCESSES": "2", "LLMCXR_PROCESS_ID": "1"}
    info = distributed.initialize_distributed(env=env)
    assert info == {"mode": "explicit", "coordinator": "h:1", "num_processes": 2, "process_id": 1,
                    "local_device_ids": None}
    assert distributed.initialize_distributed(env=env) is info
    assert fake_jax_distributed == [(("h:1", 2, 1, None), {"cluster_detection_method": "deactivate"})]


def test_initialize_tpu_lets_jax_detect(fake_jax_distributed):
    info = distributed.initialize_distributed(env={"TPU_WORKER_HOSTNAMES": "t0,t1"})
    assert fake_jax_distributed == [((), {})]
    assert info["mode"] == "tpu"


def _spawn(tag, out, devices, tmp_path, extra_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMCXR_", "SLURM_", "TPU_", "JAX_"))}
    # optimization level 0 halves XLA:CPU compile time; every process uses the same flags
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
               **extra_env)
    log = open(tmp_path / f"{tag}.log", "w")
    return subprocess.Popen([sys.executable, WORKER, str(out)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT), tmp_path / f"{tag}.log"


@pytest.mark.slow  # tests/test_lm_multiprocess.py runs the real trainer on two processes by default
def test_two_processes_train_like_one(tmp_path):
    """2 processes x 2 CPU devices (gloo collectives) == 1 process x 4 devices, on two meshes."""
    port = portpicker.pick_unused_port()
    multi, single = tmp_path / "multi.npz", tmp_path / "single.npz"
    t0 = time.time()
    procs = [_spawn(f"process{i}", multi, 2, tmp_path, {
        "LLMCXR_COORDINATOR": f"localhost:{port}", "LLMCXR_NUM_PROCESSES": "2", "LLMCXR_PROCESS_ID": str(i)})
        for i in range(2)]
    procs.append(_spawn("reference", single, 4, tmp_path, {}))
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, 240 - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(log, proc.returncode) for proc, log in procs if proc.returncode != 0]
    assert not failed, "\n".join(f"{log.name} exit {rc}:\n{log.read_text()[-4000:]}" for log, rc in failed)
    print(f"two-process job and reference: {time.time() - t0:.1f}s")

    got, want = np.load(multi), np.load(single)
    assert int(got["process_count"]) == 2 and int(want["process_count"]) == 1
    for mesh in ("data4", "data2_fsdp2"):
        # the global batch holds every host's rows where the devices expect them
        np.testing.assert_array_equal(got[f"{mesh}/batch"], got[f"{mesh}/expected_batch"])
        np.testing.assert_array_equal(want[f"{mesh}/batch"], got[f"{mesh}/expected_batch"])
        rows = got[f"{mesh}/rows_all"]
        assert rows.shape == (2, 4) and sorted(rows.ravel()) == list(range(8))  # disjoint host halves
        losses = got[f"{mesh}/losses"]
        assert losses[-1] < losses[0] - 0.3  # the steps trained
        np.testing.assert_allclose(losses, want[f"{mesh}/losses"], rtol=1e-6, atol=0)
        names = [k for k in want.files if k.startswith(f"{mesh}/param:")]
        assert len(names) == 28 and set(names) <= set(got.files)
        for k in names:
            # gloo sums gradients in another order than one process does: ~1e-8 apart, not bit-exact
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
