"""The shell text launch/tpu_pod.py runs on every TPU VM worker over `gcloud ... ssh --command`: set up
the pinned commit, start training detached with a state file (RUNNING, then DONE / STOPPED / FAILED;
LOST when the recorded pid is gone), poll it, and stop it (SIGTERM, then SIGKILL). Stdlib only.
"""
from __future__ import annotations

import shlex

REPO_DIR = "$HOME/llmcxr-jax"  # on every worker
VENV_DIR = "$HOME/llmcxr-venv"
LOG_DIR = "$HOME/llmcxr_logs"  # train_worker<i>.log, state_worker<i> ("RUNNING pid" | "DONE pid rc" ...)
# Worker index = JAX process index on a TPU VM: the metadata key JAX's own TPU cluster detection reads
# (jax/_src/clusters/cloud_tpu_cluster.py), then the "-w-<i>" hostname suffix of TPU VMs.
WORKER_ID = ("wid=${LLMCXR_WORKER_ID:-$(curl -sf --max-time 10 -H Metadata-Flavor:Google "
             "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}",
             '[ -n "$wid" ] || wid=$(hostname | sed -n "s/.*-w-\\([0-9][0-9]*\\)\\$/\\1/p")',
             '[ -n "$wid" ] || { echo "cannot tell this TPU worker index" >&2; exit 3; }')
# Scripts use no single quotes, so shlex.quote wraps each in one readable pair.


def _alive(var: str = "pid") -> str:
    """The process whose pid is in $<var> still runs and is ours (a pid reused after a reboot is not)."""
    return f'kill -0 "${var}" 2>/dev/null && grep -qa llmcxr "/proc/${var}/cmdline" 2>/dev/null'


ALIVE = _alive()  # the trainer recorded in the state file


def _script(*statements: str) -> str:
    """One shell line (dry-run prints one command per line); no `;` after a backgrounding `&`."""
    out = ""
    for s in statements:
        out += s + (" " if s.endswith("&") else "; ")
    return out.rstrip("; ")


def _state_file() -> str:
    return f"{LOG_DIR}/state_worker$wid"


def _write_state(text: str, path: str) -> str:
    """Replace the state file atomically (write a sibling, rename it over): a poll that reads while the
    state changes sees the old line or the new one, never the empty file `echo >` leaves for a moment."""
    return f'echo "{text}" >"{path}.$$" && mv -f "{path}.$$" "{path}"'


def setup_script(repo: str, commit: str, python: str) -> str:
    """Clone or fetch, check out the pinned commit, install llmcxr-jax (with its [gcs] extra, for
    gs:// workdirs) and jax[tpu] into a venv."""
    git = f'git -C "{REPO_DIR}"'
    return _script(
        "set -e", *WORKER_ID,
        f'if [ -d "{REPO_DIR}/.git" ]; then {git} fetch --quiet origin; else git clone --quiet {shlex.quote(repo)} '
        f'"{REPO_DIR}"; fi',
        f"{git} cat-file -e {commit}^{{commit}} 2>/dev/null || {git} fetch --quiet origin {commit}",
        f"{git} checkout --quiet --detach {commit}",
        # TPU VM images are Ubuntu 22.04 (Python 3.10); uv brings the Python llmcxr-jax needs.
        f'if [ ! -x "{VENV_DIR}/bin/python" ]; then (python3 -m pip install --quiet --user uv || python3 -m pip '
        f'install --quiet --user --break-system-packages uv) && "$HOME/.local/bin/uv" venv --seed --python {python} '
        f'"{VENV_DIR}"; fi',
        f'"{VENV_DIR}/bin/python" -m pip install --quiet -c "{REPO_DIR}/requirements-lock.txt" -e "{REPO_DIR}[gcs]" '
        '"jax[tpu]"',
        f'echo "llmcxr setup worker=$wid commit=$({git} rev-parse HEAD)"')


def run_script(command: str, train_args: list[str], workdir: str, commit: str | None = None,
               env: tuple[str, ...] = ()) -> str:
    """Start `llmcxr <command> ... --workdir W` detached (setsid nohup) and return at once.

    The detached wrapper appends the output to train_worker<i>.log and records in state_worker<i>
    "RUNNING pid wrapper_pid", then on exit "FAILED pid rc", "STOPPED pid 0" (exit 0, but the
    summary line the trainer prints last says "preempted": true: SIGTERM, checkpoint saved before
    train.steps) or "DONE pid 0" (exit 0 otherwise: train.steps reached).
    """
    log, state = f"{LOG_DIR}/train_worker$WID.log", f"{LOG_DIR}/state_worker$WID"
    train = shlex.join([command, *train_args, "--workdir", workdir])
    inner = _script(
        f'exec >>"{log}" 2>&1 </dev/null',
        f'echo "=== llmcxr launch $(date -u +%FT%TZ) worker $WID commit $(git -C "{REPO_DIR}" rev-parse HEAD)"',
        f'cd "{REPO_DIR}"',
        "export LLMCXR_DISTRIBUTED=tpu", *(f"export {shlex.quote(e)}" for e in env),
        f'"{VENV_DIR}/bin/llmcxr" {train} &',
        "pid=$!",
        _write_state("RUNNING $pid $$", state),  # the wrapper outlives the trainer until the final state is written
        "wait $pid",
        "rc=$?",
        # exit 0 means this launch printed the last summary line in the log
        f'if [ $rc -ne 0 ]; then s=FAILED; elif grep "^{{\\"workdir\\"" "{log}" | tail -n 1 | '
        'grep -q "\\"preempted\\": true"; then s=STOPPED; else s=DONE; fi',
        _write_state("$s $pid $rc", state),
        'echo "=== llmcxr exit $rc ($s)"')
    checks = []
    if commit:
        git = f'git -C "{REPO_DIR}"'
        checks.append(f'[ "$({git} rev-parse HEAD)" = "$({git} rev-parse --verify -q {commit}^{{commit}})" ] || '
                      f'{{ echo "worker $wid: {REPO_DIR} is not at {commit}; run setup" >&2; exit 3; }}')
    return _script(
        *WORKER_ID, *checks,
        f'mkdir -p "{LOG_DIR}"',
        f'if [ -f "{_state_file()}" ] && read s pid rc <"{_state_file()}" && [ "$s" = RUNNING ] && {ALIVE}; '
        'then echo "worker $wid: training already runs (pid $pid); stop it first" >&2; exit 3; fi',
        _write_state("STARTING", _state_file()),
        f"WID=$wid setsid nohup bash -c {shlex.quote(inner)} >/dev/null 2>&1 </dev/null &",
        f'echo "llmcxr run worker=$wid log={LOG_DIR}/train_worker$wid.log"')


def poll_script() -> str:
    """One line per worker: `llmcxr-state worker=<i> <STATE>[ rc=<rc>]`; LOST = RUNNING but both the
    trainer and its wrapper are gone (the trainer alone exits a moment before the wrapper records why).
    Gone is judged after the read, so the state is read again then: the wrapper may have recorded the
    exit and left in between, and only a file still RUNNING with nobody left to change it is LOST."""
    return _script(
        *WORKER_ID, "s=NONE", "pid=", "rc=",
        f'if [ -f "{_state_file()}" ]; then read s pid rc <"{_state_file()}"; fi',
        f'if [ "$s" = RUNNING ]; then w=$rc; rc=; if ! {{ {ALIVE}; }} && ! {{ {_alive("w")}; }}; then '
        f'read s pid rc <"{_state_file()}"; if [ "$s" = RUNNING ]; then s=LOST; rc=; fi; fi; fi',
        'echo "llmcxr-state worker=$wid $s${rc:+ rc=$rc}"')


def stop_script(timeout_s: int) -> str:
    """SIGTERM the trainer (it saves a checkpoint and exits 0); SIGKILL it if it is still there after
    timeout_s (blocked in a collective whose peer died, it never runs its SIGTERM handler)."""
    return _script(
        *WORKER_ID, "s=", "pid=",
        f'if [ -f "{_state_file()}" ]; then read s pid rc <"{_state_file()}"; fi',
        f'if ! [ "$s" = RUNNING ] || ! {{ {ALIVE}; }}; then '
        'echo "llmcxr stop worker=$wid: nothing running"; exit 0; fi',
        'kill -TERM "$pid"',
        f'for i in $(seq {timeout_s}); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done',
        f'if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; echo "llmcxr stop worker=$wid pid=$pid: killed after '
        f'{timeout_s} s"; else echo "llmcxr stop worker=$wid pid=$pid"; fi')
