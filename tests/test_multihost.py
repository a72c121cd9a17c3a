"""Multi-process training for real: two `tools.train` processes on CPU (4 simulated devices each)
joined by jax.distributed on a localhost port, against one process with all 8 devices on the same
mesh (fsdp=8). Also: when tools.train starts jax.distributed (jax's own cluster detection), and that
a failed start is one line.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from tools import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = "train=24,validation=4,test=4"
FIRST, STEPS = 2, 3  # the 2-process run trains 1-2, saves, stops, and is restarted for step 3
# Every variable a cluster detector reads: the subprocesses and the detection tests start clean.
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_", "SLURM_", "OMPI_", "TPU_", "KUBERNETES_",
                "JOB_COMPLETION_INDEX")


def _clean_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
    # LLVM at -O0: compiling the step takes half as long (process 1 always compiles: only process
    # 0 writes the persistent cache, and the cache key holds the local devices). Both sides of every
    # comparison run with the same flags.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_cmd(workdir, data_dir, steps, *extra, checkpoint_every=FIRST, config="configs/tiny_pretrain.py"):
    return [sys.executable, "-m", "tools.train", "--config", config, "--workdir", str(workdir),
            f"--config.total_steps={steps}", "--config.log_every=1", f"--config.checkpoint_every={checkpoint_every}",
            # 8 examples: the batch splits over all 8 devices of the fsdp=8 mesh, 4 per process.
            "--config.batch_size=8", f"--config.data.data_dir={data_dir}",
            f"--config.data.synthetic_split_sizes={SIZES}", "--progress=false", *extra]


def _start(cmd, env, log: pathlib.Path):
    with open(log, "w") as out:  # files, not pipes: a full pipe would stall a process mid-collective
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(procs: dict, timeout=400):
    """name -> (Popen, log) all exit 0; else every one still running is killed and the logs shown."""
    deadline = time.time() + timeout
    try:
        for name, (proc, log) in procs.items():
            rc = proc.wait(timeout=max(1, deadline - time.time()))
            assert rc == 0, f"{name} exited {rc}:\n{log.read_text()[-3000:]}"
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: log.read_text() for name, (_, log) in procs.items()}


def _two_processes(tmp, workdir, data_dir, steps, tag, *extra, **kwargs):
    port = _free_port()
    procs = {}
    for i in range(2):
        cmd = _train_cmd(workdir, data_dir, steps, f"--coordinator_address=localhost:{port}",
                         "--num_processes=2", f"--process_id={i}", *extra, **kwargs)
        log = tmp / f"{tag}.{i}.log"
        procs[f"{tag} process {i}"] = (_start(cmd, _clean_env(4), log), log)
    return procs


def _metrics(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def _checkpoints(workdir):
    return sorted(os.listdir(workdir / "checkpoints"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference (STEPS steps) and the 2-process run (FIRST steps, then restarted
    to STEPS): logs, metrics and checkpoint listings of each phase."""
    tmp = tmp_path_factory.mktemp("multihost")
    data_dir, ref, multi = tmp / "data", tmp / "ref", tmp / "multi"
    # The reference runs beside the first 2-process run (which leaves a core idle while its process
    # 1 compiles; the synthetic data is built once, under a lock, by whichever starts first). It
    # saves only at its end: checkpoints do not change the numbers, and cost time.
    procs = _two_processes(tmp, multi, data_dir, FIRST, "first")
    ref_cmd = _train_cmd(ref, data_dir, STEPS, checkpoint_every=1000)
    procs["reference"] = (_start(ref_cmd, _clean_env(8), tmp / "ref.log"), tmp / "ref.log")
    first = _wait(procs)
    first_metrics, first_checkpoints = _metrics(multi), _checkpoints(multi)
    resumed = _wait(_two_processes(tmp, multi, data_dir, STEPS, "resumed"))
    return dict(first=first, resumed=resumed, ref=_metrics(ref), first_metrics=first_metrics,
                first_checkpoints=first_checkpoints, metrics=_metrics(multi), checkpoints=_checkpoints(multi),
                multi=multi)


def test_each_process_loads_only_its_share(runs):
    """Each process reports the examples it consumed: 4 of every 8 (its half, never the whole batch).
    That the halves are distinct and together the whole batch: the global batch's loss weight (a sum of
    0/1 token weights, exact in float32) equals the single-process one every step; duplicated or
    missing rows would change it."""
    for i in range(2):
        assert (f"process {i} of 2 (4 of 8 devices): loaded {4 * FIRST} examples for steps 1-{FIRST} "
                f"(4 of every 8)") in runs["first"][f"first process {i}"]
        assert (f"process {i} of 2 (4 of 8 devices): loaded 4 examples for steps {STEPS}-{STEPS} "
                f"(4 of every 8)") in runs["resumed"][f"resumed process {i}"]
    assert "process 0 of" not in runs["first"]["reference"]  # a plain run stays single-process
    assert [r["weight"] for r in runs["metrics"]] == [r["weight"] for r in runs["ref"]]


def test_losses_match_the_single_process_run(runs):
    """Same data, same mesh shape, same program: only the cross-device reductions may differ (across
    processes they go through gloo), so the losses agree to float32 rounding. rtol 1e-5 (~80 float32
    epsilons) is what the mesh-equivalence test allows; measured: bit-identical here, <= 1e-7 relative
    at XLA's default -O2. A wrong batch (one process's rows only, or another step's data after the
    restart) moves the loss by 1e-3 relative or more."""
    ref = {r["step"]: r["loss"] for r in runs["ref"]}
    got = {r["step"]: r["loss"] for r in runs["metrics"]}
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step


def test_checkpoints_are_written_once_and_the_run_resumes(runs):
    # The first run saved its last step; the restart trained only the step after it (from that
    # checkpoint and data position: its loss and weight match the reference's, tests above).
    assert runs["first_checkpoints"] == [str(FIRST)]
    assert [r["step"] for r in runs["first_metrics"]] == list(range(1, FIRST + 1))
    assert runs["checkpoints"] == [str(FIRST), str(STEPS)]  # and no temporary directories left behind
    # One writer of the metrics (process 0): every step once; the restart appended its step only.
    assert [r["step"] for r in runs["metrics"]] == list(range(1, STEPS + 1))
    # One checkpoint per step, each process writing only its own shards of it (ocdbt.process_N)
    # under one set of metadata, which holds the data position.
    for step in (FIRST, STEPS):
        saved = runs["multi"] / "checkpoints" / str(step)
        for item in ("params", "opt_state"):
            assert sorted(p.name for p in (saved / item).glob("ocdbt.process_*")) == [
                "ocdbt.process_0", "ocdbt.process_1"], (step, item)
            assert (saved / item / "_METADATA").is_file()
        assert (saved / "commit_success.txt").is_file()
        meta = json.loads((saved / "meta" / "metadata").read_text())
        assert meta["step"] == step and meta["data_state"]["next_batch"] == step


def test_molmo2_losses_match_the_single_process_run(tmp_path):
    """A Molmo2's pooling indices point into its process's own crops until the trainer offsets them
    (`molmo2_example.global_pooling`); with packed rows (2 records each) the two-process run must see the single
    process's global batch: the same loss weight exactly and the same losses to float32 rounding. `fan_in`
    init keeps the image features O(1) (at the tiny default init they are ~1e-8 and the loss could not tell
    which crops were pooled): indices left unoffset, which pool process 0's crops for process 1's tokens, move
    the first loss by 2.8e-5 relative; the correct run measured bit-identical at step 1 and 1.5e-7 at step 2
    (the reductions go through gloo), hence 2e-6."""
    data_dir, ref, multi = tmp_path / "data", tmp_path / "ref", tmp_path / "multi"
    extra = ("--config.seq_len=640", "--config.data.pack_records=2", "--config.model.init=fan_in")
    kwargs = dict(checkpoint_every=1000, config="configs/molmo2_tiny_sft.py")
    procs = _two_processes(tmp_path, multi, data_dir, FIRST, "molmo2", *extra, **kwargs)
    ref_cmd = _train_cmd(ref, data_dir, FIRST, *extra, **kwargs)
    procs["reference"] = (_start(ref_cmd, _clean_env(8), tmp_path / "ref.log"), tmp_path / "ref.log")
    _wait(procs)
    got, want = _metrics(multi), _metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, FIRST + 1))
    for g, w in zip(got, want):
        assert g["weight"] == w["weight"] and g["loss"] == pytest.approx(w["loss"], rel=2e-6), (g, w)


# -- when jax.distributed starts ----------------------------------------------------------------

@pytest.fixture
def env(monkeypatch):
    """A laptop: no cluster variables, not a Cloud TPU VM."""
    from jax._src.clusters import cloud_tpu_cluster

    for key in list(os.environ):
        if key.startswith(CLUSTER_VARS):
            monkeypatch.delenv(key)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
    return monkeypatch


def _tpu_vm(env, endpoints, fail=False):
    """A Cloud TPU VM whose metadata server (what jax's GceTpuCluster reads) lists `endpoints`."""
    from jax._src.clusters import cloud_tpu_cluster

    metadata = {"agent-worker-number": "0", "worker-network-endpoints": ",".join(endpoints),
                "tpu-env": "ACCELERATOR_TYPE: 'v5p-32'\nTPU_PROCESS_BOUNDS: '1,1,1'"}

    def get_metadata(key):
        if fail:
            raise ConnectionError("metadata.google.internal unreachable")
        return metadata[key], 200
    env.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    env.setattr(cloud_tpu_cluster, "get_metadata", get_metadata)


def test_laptop_and_single_host_stay_single_process(env):
    assert train.distributed_reason(None) is None
    _tpu_vm(env, ["10.0.0.2"])  # a single-host TPU VM (v5e-8): one worker endpoint
    assert train.distributed_reason(None) is None
    env.setenv("SLURM_JOB_ID", "77")
    env.setenv("SLURM_STEP_NODELIST", "node001")
    env.setenv("SLURM_NTASKS", "1")
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_LOCALID", "0")
    assert train.distributed_reason(None) is None  # srun -n1
    assert train.distributed_reason(True) == "--distributed"


def test_tpu_pod_slice_starts_distributed(env):
    """The README's pod command: the same command on every worker, no flag. jax's GceTpuCluster
    counts the slice's hosts from the metadata server, old (name:id:ip) or new (hostname) format."""
    _tpu_vm(env, [f"w-{i}:{i}:10.0.0.{i}" for i in range(4)])
    assert train.distributed_reason(None) == "Cloud TPU VM, 4 processes"
    _tpu_vm(env, [f"host-{i}" for i in range(16)])
    assert train.distributed_reason(None) == "Cloud TPU VM, 16 processes"
    env.setenv("MEGASCALE_NUM_SLICES", "2")  # multislice counts every slice's hosts
    assert train.distributed_reason(None) == "Cloud TPU VM, 32 processes"
    assert train.distributed_reason(False) is None
    _tpu_vm(env, [], fail=True)
    with pytest.raises(train.DistributedError, match="^Cloud TPU VM: could not read the number of processes "
                       r"\(ConnectionError: metadata.google.internal unreachable\); pass --distributed or "
                       "--nodistributed$"):
        train.distributed_reason(None)
    assert train.distributed_reason(False) is None  # --nodistributed never asks


def test_gke_tpu_slurm_mpi_and_explicit_coordinators(env):
    env.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
    env.setenv("OMPI_COMM_WORLD_SIZE", "8")
    assert train.distributed_reason(None) == "Open MPI, 8 processes"
    env.delenv("OMPI_MCA_orte_hnp_uri")
    for key, value in dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="node[001-004]", SLURM_NTASKS="4",
                           SLURM_PROCID="2", SLURM_LOCALID="0").items():
        env.setenv(key, value)
    assert train.distributed_reason(None) == "SLURM, 4 processes"
    env.delenv("SLURM_JOB_ID")
    _tpu_vm(env, ["this-node"])  # GKE: the hosts come from the env (the slice count from metadata)
    env.setenv("TPU_WORKER_HOSTNAMES", "h0,h1")
    env.setenv("TPU_WORKER_ID", "1")
    assert train.distributed_reason(None) == "TPU on GKE, 2 processes"
    env.delenv("TPU_WORKER_HOSTNAMES")
    assert train.distributed_reason(None) is None
    env.setenv("MEGASCALE_COORDINATOR_ADDRESS", "10.0.0.1:8080")
    assert train.distributed_reason(None) == "multislice TPU (MEGASCALE_COORDINATOR_ADDRESS)"
    env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert train.distributed_reason(None) == "$JAX_COORDINATOR_ADDRESS"


def test_kubernetes_is_asked_only_for_indexed_jobs(env):
    """Any pod has KUBERNETES_SERVICE_HOST; jax's check would call the API server, so it runs only
    in an indexed Job (JOB_COMPLETION_INDEX), the one kind jax can bootstrap from."""
    from jax._src.clusters import K8sCluster

    asked = []
    env.setattr(K8sCluster, "is_env_present", classmethod(lambda cls: asked.append(1) or True))
    env.setattr(K8sCluster, "get_process_count", classmethod(lambda cls: 3))
    env.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert train.distributed_reason(None) is None and not asked
    env.setenv("JOB_COMPLETION_INDEX", "0")
    assert train.distributed_reason(None) == "Kubernetes indexed Job, 3 processes" and asked


# -- a failed start is one line -----------------------------------------------------------------

def _fails_in_one_line(extra, timeout=60):
    cmd = [sys.executable, "-m", "tools.train", "--config", "configs/tiny_pretrain.py", "--workdir", "unused",
           *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(4), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "Check failure" not in proc.stderr, proc.stderr
    return errors[0], time.time() - t0


def test_missing_process_count_is_one_line():
    line, _ = _fails_in_one_line(["--distributed"])
    assert line.startswith("error: jax.distributed.initialize() failed (--distributed; coordinator from the "
                           "environment): ValueError: coordinator_address should be defined.")
    assert line.endswith("give --coordinator_address (or $JAX_COORDINATOR_ADDRESS), --num_processes and "
                         "--process_id")


def test_processes_that_never_join_are_one_line():
    """jax's coordination client aborts the process (C++ stack trace) when its deadline passes; the
    watchdog in tools.train ends it first with one line."""
    port = _free_port()
    line, seconds = _fails_in_one_line([f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                        "--process_id=1", "--distributed_timeout=2"])
    assert line == (f"error: jax.distributed.initialize(): not every process joined within 2 s (process 1 of 2, "
                    f"coordinator localhost:{port}; --coordinator_address): start all of them with the same "
                    f"coordinator address and process count, or raise --distributed_timeout")
    assert seconds < 30
