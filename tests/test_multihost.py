"""Multi-host training with real processes: 2 JAX processes x 4 fake CPU devices on localhost.

launch/local_multiprocess.sh starts ``python -m patch_diffusion.main`` twice (PATCH_DIFFUSION_COORDINATOR /
NUM_PROCESSES / PROCESS_ID -> jax.distributed.initialize, gloo CPU collectives). The run uses a one-level
tiny network (one level) and the default stochastic schedule over {4, 8, 16} (seed 0 draws 16, 16, 8, 4),
and the test hook of tests/step_record.py (the trainer plus a recording hook) so each process records the patch size, its example indices per step and
final per-device parameter digests.

The reference for "equal to a 1-process 8-device run fed the same global batches": a global batch is, by
construction of parallel.global_batch (make_array_from_process_local_data over a mesh of jax.devices(),
process 0's devices first), process 0's local batch followed by process 1's. This test process (1 process,
8 devices) rebuilds exactly those global batches from the recorded indices and runs the trainer's own
compiled steps (train.compile_steps) with the trainer's learning-rate and EMA schedule on the same initial
state and step key. If the processes disagreed on the sizes, read overlapping or wrongly ordered shards,
or reduced gradients differently, the parameters would differ.

All checks run in one test function, so the expensive 2-process run happens once even under xdist.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny_test
from patch_diffusion import experiment
from patch_diffusion import generate
from patch_diffusion import checkpointing
from patch_diffusion import parallel
from patch_diffusion import state as state_lib
from patch_diffusion import train
from patch_diffusion.data import datasets
from patch_diffusion.data import input_pipeline
from helpers import read_jsonl, tree_digest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
STEPS = 4
#: Overrides of configs/tiny_test.py, as --config.KEY=VALUE flags and as Python values.
OVERRIDES = {
    "model.channel_mult": (1,),
    "model.attn_resolutions": (),
    "train.checkpoint_every_steps": 2,
    "train.log_every_steps": 1,
    # STEPS steps of 16 x average multiplier 1.9 = 30.4 counted images each.
    "train.total_kimg": (STEPS - 0.5) * 30.4 / 1000,
}


def config():
  c = tiny_test.get_config()
  for dotted, value in OVERRIDES.items():
    section, key = dotted.split(".")
    c[section][key] = value
  return c


def flag(value) -> str:
  return f"({','.join(map(str, value))}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else str(value)


def launcher_env() -> dict[str, str]:
  """This process's environment (compilation cache included) without its 8-device XLA flag: the launcher
  gives each process 4."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  return env


def run_two_processes(workdir: pathlib.Path, logs: pathlib.Path, extra=()) -> subprocess.CompletedProcess:
  # tests/step_record.py = patch_diffusion.main plus the test hook that records each step's examples.
  cmd = [str(LAUNCHER), "-n", "2", "-d", "4", "-l", str(logs), "-k", "10", "--", sys.executable,
         str(REPO / "tests" / "step_record.py"), f"--config={REPO / 'configs' / 'tiny_test.py'}",
         f"--workdir={workdir}"]
  cmd += [f"--config.{k}={flag(v)}" for k, v in OVERRIDES.items()] + list(extra)
  return subprocess.run(cmd, cwd=REPO, env=launcher_env(), timeout=900, capture_output=True, text=True)


def params_sha256(params) -> str:
  """The digest tests/step_record.py computes per device (leaf order, raw float32 bytes)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def replay_one_process(c, steps: list[dict], other_steps: list[dict]):
  """Trains STEPS steps in this process (8 devices) on the global batches [process 0 ; process 1]."""
  exp = experiment.build_experiment(c)
  assert jax.process_count() == 1 and parallel.data_parallel_size(exp.mesh) == 8
  k_init, k_train, _ = jax.random.split(jax.random.key(c.seed), 3)
  state = jax.device_put(state_lib.create_train_state(exp.init_variables(k_init), exp.tx),
                         parallel.replicated(exp.mesh))
  compiled = train.compile_steps(exp, state, k_train, c.train.batch_size)  # local batch = global here
  source, info = datasets.get_data_source(c.data)
  pre = input_pipeline.PreprocessedSource(source, info.resolution, info.num_channels, False)
  images_per_step = c.train.batch_size * exp.schedule.average_batch_mul
  for s, (a, b) in enumerate(zip(steps, other_steps)):
    indices = a["indices"] + b["indices"]
    batch = {"image": np.stack([pre[i]["image"] for i in indices]),
             "label": np.zeros(len(indices), np.int32)}
    nimg = s * images_per_step
    lr = np.float32(state_lib.learning_rate(nimg, c.train))
    beta = np.float32(state_lib.ema_beta(nimg, images_per_step, c.train))
    mul = dict(zip(exp.schedule.sizes, exp.schedule.batch_muls))[a["size"]]
    state, _ = compiled[(a["size"], mul)](state, parallel.global_batch(batch, exp.mesh), lr, beta, k_train)
  return jax.device_get(state), exp


def restore(c, workdir: pathlib.Path):
  exp = experiment.build_experiment(c)
  template = jax.device_put(state_lib.create_train_state(exp.init_variables(jax.random.key(0)), exp.tx),
                            parallel.replicated(exp.mesh))
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  state, meta = ckpt.restore(template)
  ckpt.close()
  return jax.device_get(state), meta


@pytest.mark.slow  # ~45 s with a warm compilation cache, ~100 s cold on 2 cores
def test_two_processes_train_like_one(tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  t0 = time.time()
  proc = run_two_processes(workdir, logs)
  seconds = time.time() - t0
  process_logs = {p.name: p.read_text() for p in sorted(logs.glob("process_*.log"))}
  assert proc.returncode == 0, (proc.stderr, {k: v[-3000:] for k, v in process_logs.items()})
  assert len(process_logs) == 2
  for name, text in process_logs.items():
    assert "JAX process" in text and "4 local / 8 global devices" in text, name
    assert "training done: step 4" in text, name
  print(f"2-process run: {seconds:.1f} s")

  # --- both processes used the same patch size at every step: the schedule's -----------------------
  c = config()
  recs = [read_jsonl(workdir / f"sizes_process_{i}.jsonl") for i in range(2)]
  steps = [[r for r in rec if "step" in r] for rec in recs]
  assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == list(range(STEPS))
  sizes = [[r["size"] for r in s] for s in steps]
  assert sizes[0] == sizes[1]
  exp = experiment.build_experiment(c, check_data=False)
  assert sizes[0] == [exp.schedule.patch_size(s) for s in range(STEPS)] == [16, 16, 8, 4]

  # --- their data shards are disjoint, each a contiguous part of the split --------------------------
  for s in range(STEPS):
    mul = dict(zip(exp.schedule.sizes, exp.schedule.batch_muls))[sizes[0][s]]
    assert len(steps[0][s]["indices"]) == len(steps[1][s]["indices"]) == 8 * mul
  seen = [[i for r in s for i in r["indices"]] for s in steps]
  assert len(set(seen[0])) == len(seen[0]) and len(set(seen[1])) == len(seen[1])  # no repeats in an epoch
  assert not set(seen[0]) & set(seen[1])
  assert max(seen[0]) < min(seen[1])  # grain shards: process 0 reads the first half, process 1 the second

  # --- parameters identical on all 8 devices of both processes --------------------------------------
  finals = [[r for r in rec if "final_step" in r] for rec in recs]
  assert all(len(f) == 1 and f[0]["final_step"] == STEPS for f in finals)
  for key in ("params_sha256", "state_sha256"):
    digests = {d for f in finals for d in f[0][key].values()}
    assert len(digests) == 1, (key, finals)
    assert sum(len(f[0][key]) for f in finals) == 8

  # --- the checkpoint is written once: one committed folder per step, no leftovers -------------------
  ckpt_dir = workdir / "checkpoints"
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2", "4"]
  for step in ("2", "4"):
    d = ckpt_dir / step
    assert (d / "commit_success.txt").is_file() and (d / "_CHECKPOINT_METADATA").is_file()
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["meta", "state"]
    meta = json.loads((d / "meta" / "metadata").read_text())
    assert meta["step"] == int(step)
    assert [s["pipeline"]["process_index"] for s in meta["data_state"]] == [0, 1]
    assert all(s["pipeline"]["process_count"] == 2 for s in meta["data_state"])
  for name, text in process_logs.items():
    assert text.count("checkpoint 4 (final") == 1, name

  # --- a 1-process run restores it: the same parameters as the digests -------------------------------
  restored, meta = restore(c, workdir)
  assert meta["step"] == STEPS and len(meta["data_state"]) == 2
  assert params_sha256(restored.params) == next(iter(finals[0][0]["params_sha256"].values()))

  # --- and they equal a 1-process 8-device run on the same global batches ---------------------------
  replayed, _ = replay_one_process(c, steps[0], steps[1])
  diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(replayed.params),
                                                        jax.tree.leaves(restored.params))]
  print(f"max |params(2 processes) - params(1 process)| = {max(diffs):.3g}")
  for a, b in zip(jax.tree.leaves(replayed), jax.tree.leaves(restored)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # --- training on with 1 process refuses the 2-process data positions, touching nothing -------------
  before = tree_digest(ckpt_dir)
  with pytest.raises(checkpointing.CheckpointError, match="data positions of 2 processes but this run has 1"):
    train.train_and_evaluate(c, str(workdir))
  assert tree_digest(ckpt_dir) == before

  # --- sample mode from 1 process works on the 2-process checkpoint ----------------------------------
  path = generate.sample(c, str(workdir))
  with np.load(path) as f:
    images = f["images"]
  assert images.shape == (c.sample.num_samples, 16, 16, 1) and images.dtype == np.uint8
  assert images.std() > 0
  assert tree_digest(ckpt_dir) == before


def test_launcher_propagates_failure_and_stops_the_others(tmp_path):
  """One process fails: the launcher stops the survivors (SIGTERM, then SIGKILL) and returns its code."""
  script = ('[ "$PATCH_DIFFUSION_PROCESS_ID" = 1 ] && { sleep 1; exit 3; }; trap "" TERM; '
            'echo "$PATCH_DIFFUSION_COORDINATOR $PATCH_DIFFUSION_NUM_PROCESSES" > "$0.$PATCH_DIFFUSION_PROCESS_ID"; '
            'sleep 60')
  t0 = time.time()
  proc = subprocess.run([str(LAUNCHER), "-n", "3", "-k", "1", "--", "bash", "-c", script, str(tmp_path / "p")],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr
  assert time.time() - t0 < 20  # not the 60 s the survivors would sleep (they ignore SIGTERM: SIGKILLed)
  assert "process 1" in proc.stderr and "exited with 3" in proc.stderr
  for i in (0, 2):
    addr, n = (tmp_path / f"p.{i}").read_text().split()
    assert addr.startswith("localhost:") and n == "3"
  ok = subprocess.run([str(LAUNCHER), "-n", "2", "--", "bash", "-c", "exit 0"], capture_output=True, timeout=60)
  assert ok.returncode == 0


def _free_port_in(lo: int, hi: int) -> int:
  import socket  # pylint: disable=g-import-not-at-top
  for port in range(lo, hi):
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port")


def test_slurm_environment_is_detected(tmp_path):
  """What srun gives each task (SLURM_* variables) is enough: main.py lets JAX find the cluster itself.

  Two processes with srun's variables for a 2-task step on this host; an invalid config stops them right
  after jax.distributed.initialize() (the config is validated after the cluster is up).
  """
  port = _free_port_in(65535 - 2**12 + 1, 65535)  # JAX takes the port from the job id in this range
  base = launcher_env()
  procs = []
  for i in range(2):
    env = dict(base, JAX_PLATFORMS="cpu", SLURM_JOB_ID=str(port - (65535 - 2**12 + 1)), SLURM_NTASKS="2",
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NODELIST="localhost",
               SLURM_STEP_NUM_NODES="1")
    env["XLA_FLAGS"] = (env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4").strip()
    log = open(tmp_path / f"task_{i}.log", "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "patch_diffusion.main", f"--config={REPO / 'configs' / 'tiny_test.py'}",
         f"--workdir={tmp_path / 'run'}", "--config.patch.real_p=2.0"], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT), log))
  for i, (p, log) in enumerate(procs):
    p.wait(timeout=300)
    log.close()
    text = (tmp_path / f"task_{i}.log").read_text()
    assert f"JAX process {i}/2, 4 local / 8 global devices (cpu)" in text, text[-3000:]
    assert "patch.real_p = 2.0: must be >= 0 and <= 1" in text
    assert p.returncode != 0


def test_tpu_pod_launcher_commands():
  """tpu_pod.sh (DRY_RUN=1) copies the code to and runs the trainer on every worker; the sbatch parses."""
  for script in ("tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"):
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0, script
  proc = subprocess.run([str(REPO / "launch" / "tpu_pod.sh"), "my-v4-32", "us-central2-b", "configs/celeba64.py",
                         "gs://bucket/runs/c64", "--config.train.batch_size=512"],
                        env=dict(os.environ, DRY_RUN="1", TARBALL_FROM="tree", PROJECT="my-project"),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  scp, ssh = proc.stdout.strip().splitlines()
  assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp
  assert "--zone=us-central2-b" in scp and "--project=my-project" in scp
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh my-v4-32 --worker=all --zone=us-central2-b")
  assert "pip install -q -e \\'.[tpu]\\'" in ssh
  assert ("python3 -m patch_diffusion.main --config=configs/celeba64.py --workdir=gs://bucket/runs/c64 "
          "--config.train.batch_size=512") in ssh
  assert subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh")], capture_output=True).returncode == 2
