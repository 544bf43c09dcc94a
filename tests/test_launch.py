"""Cluster-grade launch: run ids, resume into the same run directory and W&B run, Slurm checks."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

from launch.run_dir import WANDB_ID_FILE, run_id
from launch.cli import main
from tests.helpers import REPO, ZOO, tiny_data
from tests.wandb_records import history, wait_complete
from tests.wandb_records import run_id as wandb_file_run_id

DEMO = str(REPO / "launch/recipes/demo.yaml")


def _run_dir(out: str) -> Path:
    return Path(out.split("run directory: ")[-1].splitlines()[0])


def test_two_in_process_runs_get_two_run_dirs(tiny_imagenet, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ZOO_RUN_ID", raising=False)
    args = ["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.fast_dev_run", "1",
            "--run.root", str(tmp_path), "--run.logger", "none"]
    assert main(args) == 0
    first = _run_dir(capsys.readouterr().out)
    assert main(args) == 0
    second = _run_dir(capsys.readouterr().out)
    assert first != second and first.parent == second.parent
    assert "ZOO_RUN_ID" not in os.environ  # main() leaves no run id behind


def test_explicit_default_root_dir_wins(tiny_imagenet, tmp_path, capsys):
    target = tmp_path / "mine"
    assert main(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.fast_dev_run", "1",
                 "--trainer.default_root_dir", str(target), "--run.logger", "none"]) == 0
    assert _run_dir(capsys.readouterr().out) == target


def test_run_id_rules():
    # parallel runs started in the same second differ
    assert len({run_id({}) for _ in range(50)}) == 50
    # every task of one srun step, on every node, agrees; another step of the allocation is another run
    task = {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "zoo", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    assert run_id({**task, "SLURM_PROCID": "0"}) == run_id({**task, "SLURM_PROCID": "7", "SLURM_NODEID": "1"})
    assert run_id(task) == "slurm-77.0" != run_id({**task, "SLURM_STEP_ID": "1"})
    # an interactive allocation (`srun --pty bash`, then zoo fit twice): two runs
    shell = {**task, "SLURM_JOB_NAME": "bash"}
    assert run_id(shell) != run_id(shell)
    # a one-task batch script without srun: stable across a requeue as well
    batch = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "zoo", "SLURM_JOB_ID": "78"}
    assert run_id(batch) == run_id(batch) == "slurm-78.batch"
    # a launcher's (or main()'s, for Lightning's DDP children) id wins
    assert run_id({**task, "ZOO_RUN_ID": "given"}) == "given"


def test_torchrun_workers_agree_through_the_agent_store():
    from datetime import timedelta

    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    env = {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port)}
    ids = {run_id({**env, "RANK": str(r), "GROUP_RANK": str(r // 2)}) for r in range(4)}
    assert len(ids) == 1  # "none" on every node, yet one id
    assert run_id({**env, "TORCHELASTIC_RUN_ID": "job2"}) not in ids


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0"},
         ["--trainer.devices", "1"], "--ntasks-per-node=2 but --trainer.devices=1"),
        ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"}, ["--trainer.devices", "2"], "not started by srun"),
    ],
)
def test_slurm_launch_mistakes_end_in_one_line(env, args, expected, tiny_imagenet, tmp_path, capsys, monkeypatch):
    for k, v in {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "5", "SLURM_JOB_NAME": "zoo", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", **env}.items():
        monkeypatch.setenv(k, v)
    rc = main(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.accelerator", "cpu",
               "--trainer.max_epochs", "1", "--run.root", str(tmp_path), "--run.logger", "none", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(err) == 1 and expected in err[0], err


def test_missing_recipe_is_one_line(tmp_path, capsys):
    assert main(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: recipe {tmp_path / 'nope.yaml'} not found") and "resnet50" in err[0]
    assert main(["fit", "--config", "resnet5"]) == 2  # a recipe name that is not there
    assert "error: recipe resnet5 not found" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_continues_run_dir_last_ckpt_and_wandb_run(tiny_imagenet, tmp_path, capsys, monkeypatch):
    """fit 2 epochs, move the run directory (scratch -> home, as clusters purge scratch), then
    `--ckpt_path <moved>/checkpoints/last.ckpt` to 4 epochs: training continues in the moved run
    directory, last.ckpt is epoch 3 (no last-v1.ckpt: the checkpoint's callback state names the
    old directory, so Lightning's version counter would step in), and both W&B offline parts carry
    one id with the steps continuing."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = ["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.log_every_n_steps", "1",
            "--run.root", str(tmp_path), "--run.logger", "wandb"]
    assert main([*base, "--trainer.max_epochs", "2"]) == 0
    scratch = _run_dir(capsys.readouterr().out)
    assert torch.load(scratch / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    run_dir = tmp_path / "home" / scratch.name
    run_dir.parent.mkdir()
    scratch.rename(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert main([*base, "--trainer.max_epochs", "4", "--ckpt_path", str(last)]) == 0
    assert _run_dir(capsys.readouterr().out) == run_dir
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3

    wid = (run_dir / WANDB_ID_FILE).read_text().strip()
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    # wandb names a folder offline-run-<second>-<id>, with "-1" appended when a second part
    # starts within the same second (seen on an idle machine)
    same_id = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(wid)}(-\d+)?")
    assert len(parts) == 2 and all(same_id.fullmatch(p.name) for p in parts), parts
    steps = []
    for part in parts:
        (run_file,) = part.glob("run-*.wandb")
        wait_complete(run_file)
        assert wandb_file_run_id(run_file) == wid
        steps.append(sorted({row["trainer/global_step"] for row in history(run_file) if "train/loss_step" in row}))
    first, second = steps
    # 9 train images / batch 4 = 3 steps per epoch (drop_last keeps 2): steps go on where they stopped
    assert first and second and second[0] == first[-1] + 1, steps
    assert first == list(range(first[0], first[-1] + 1)) and second == list(range(second[0], second[-1] + 1))


# ----------------------------------------------------------------------------- preemption


def _srun_task_env(job: str, rank: int, ntasks: int, port: int, bin_dir: Path) -> dict[str, str]:
    """What srun gives task ``rank`` of a one-node step (Lightning's SLURMEnvironment reads it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
            "SLURM_JOB_NAME": "zoo", "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks),
            "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_preemption_requeue_pieces(tmp_path, monkeypatch):
    """The job id scontrol takes, the next hpc checkpoint's name, and a refused requeue in one line."""
    from callbacks.preemption import Preempted, hpc_save_path, slurm_job_id

    assert slurm_job_id({"SLURM_JOB_ID": "17"}) == "17"
    assert slurm_job_id({"SLURM_JOB_ID": "17", "SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3"}) == "9_3"
    assert slurm_job_id({"SLURM_JOB_ID": "17; rm -rf /"}) is None and slurm_job_id({}) is None
    for n in (1, 3):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    assert hpc_save_path(str(tmp_path)) == str(tmp_path / "hpc_ckpt_4.ckpt")  # Lightning resumes from the highest
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'scontrol: error: Requested operation is disabled' >&2\nexit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = Preempted("/runs/x/hpc_ckpt_1.ckpt", 10, True, int(signal.SIGUSR1))
        error = stop.requeue({"SLURM_JOB_ID": "17"})
        assert error == ("scontrol requeue 17 failed (scontrol: error: Requested operation is disabled): resubmit the "
                         "job (sbatch --requeue); it resumes from /runs/x/hpc_ckpt_1.ckpt")
        assert Preempted("c", 1, False, 10).requeue({"SLURM_JOB_ID": "17"}) is None  # only rank 0 requeues
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # the requeue's SIGTERM finds a leaving process
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
@pytest.mark.ddp
def test_preemption_signal_to_one_rank_stops_every_rank_at_one_step(tiny_imagenet, tmp_path):
    """SIGUSR1 reaches rank 1 of a 2-task step only (on several nodes the signal arrives at
    different times; here, never on rank 0). Lightning 2.6's own handler saves from inside the
    handler on rank 1 alone and waits in the save's barrier while rank 0 trains on: a deadlock
    (seen: rank 0 in a metric all_gather, rank 1 in Trainer.save_checkpoint's barrier).
    callbacks.preemption.SlurmRequeue: both ranks save at the same step, exit 0, rank 0 runs
    `scontrol requeue JOB` (a stub here), and the W&B run holds every step up to the checkpoint.
    Processes are started as srun would (SLURM_* variables), so no Slurm is needed; the resume
    is test_preempted_job_requeues_and_resumes's (local Slurm)."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job, epochs = "4242", 10  # 3 steps per epoch (18 images, global batch 6): 30 steps
    args = [ZOO, "fit", "--config", DEMO, *tiny_data(tiny_imagenet, batch=6), "--trainer.accelerator", "cpu",
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", str(epochs),
            "--trainer.log_every_n_steps", "1", "--run.root", str(tmp_path / "runs"), "--run.logger", "wandb",
            "--run.dashboard", "false",
            "--trainer.callbacks+=callbacks.preemption.SlurmRequeue", "--trainer.callbacks.check_every_n_steps=2"]

    def start(part: str) -> list[subprocess.Popen]:
        port = _free_port()
        logs = [open(tmp_path / f"{part}-rank{r}.log", "w") for r in range(2)]
        return [subprocess.Popen(args, cwd=tmp_path, env=_srun_task_env(job, r, 2, port, bin_dir), stdout=logs[r],
                                 stderr=subprocess.STDOUT) for r in range(2)]

    def finish(procs: list[subprocess.Popen], part: str) -> list[str]:
        try:
            for p in procs:
                p.wait(timeout=180)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()  # the deadlock: both ranks wait for each other forever
        logs = [(tmp_path / f"{part}-rank{r}.log").read_text(errors="replace") for r in range(2)]
        assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
        return logs

    ranks = start("part1")
    log0 = tmp_path / "part1-rank0.log"
    # epoch 1 runs once epoch 0's last.ckpt exists (off a terminal the bar prints no "Epoch 1:")
    _wait(lambda: any((tmp_path / "runs").rglob("last.ckpt")) or ranks[0].poll() is not None, 240,
          "part 1 does not train", poll=0.05)
    ranks[1].send_signal(signal.SIGUSR1)
    out0, out1 = finish(ranks, "part1")
    run_dir = tmp_path / "runs" / "convnet" / f"slurm-{job}.0"
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    g = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert f"every rank stopped at step {g}" in out0 and f"saved {hpc}" in out0, out0[-3000:]
    assert 3 <= g < epochs * 3 and g % 2 == 0  # after the signal (epoch 1), at a check step
    assert calls.read_text().splitlines() == [f"requeue {job}"]  # rank 0 only, once
    assert f"requeued Slurm job {job}" in out0 and "Traceback" not in out0 + out1
    # the zoo's handler says what it does; Lightning's line about its own (not installed) handler is hidden
    assert "zoo: Slurm preemption: SIGUSR1 saves a checkpoint" in out0 and "SLURM auto-requeueing enabled" not in out0

    # W&B: the run was finished before the requeue (an exit record), with every step up to the
    # checkpoint; the resumed part (test_preempted_job_requeues_and_resumes, on the local Slurm)
    # goes on from step g
    (part,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = part.glob("run-*.wandb")
    wait_complete(run_file, timeout=5)
    assert wandb_file_run_id(run_file) == (run_dir / WANDB_ID_FILE).read_text().strip()
    steps = sorted({row["trainer/global_step"] for row in history(run_file) if "train/loss_step" in row})
    assert steps == list(range(0, g)), (g, steps)


def test_preempted_sweep_trial_stays_running_for_the_requeued_task(tiny_imagenet, tmp_path, capsys, monkeypatch):
    """A trial whose job was preempted (saved, requeued: `_train` exits 75) is neither failed nor
    retried: it stays RUNNING under this worker, which the requeued task finds and resumes."""
    from launch import sweep as zsweep
    from launch.sweep import train as sweep_train
    from tests.test_workflow import _tiny_spec

    monkeypatch.setattr(sweep_train, "train_in_process", lambda argv, env: zsweep.PREEMPTED_EXIT)
    spec, root = _tiny_spec(tmp_path, tiny_imagenet), tmp_path / "sweeps"
    main(["sweep", spec, "--run.root", str(root), "--in_process", "--wandb", "false"])
    assert "round 1 trial 0: preempted; the requeued task resumes it" in capsys.readouterr().err
    assert main(["sweep", spec, "--run.root", str(root), "--status"]) == 0
    status = capsys.readouterr().out
    assert "RUNNING" in status and "FAIL" not in status and "WAITING" not in status, status


# ----------------------------------------------------------------------------- local Slurm


def _scontrol_job(job_id: str) -> dict[str, str]:
    import subprocess

    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(pred, timeout: float, what: str, poll: float = 1.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(what)


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_job_requeues_and_resumes(tiny_imagenet, tmp_path):
    """SIGUSR1 to a running 2-task train.sbatch job: both ranks save an hpc checkpoint at one step
    (callbacks.preemption) and the job is requeued; the same job id runs again, resumes from that
    checkpoint (the step goes on, no gap, no repeat, same W&B run), finishes, and the output file
    still holds the first part's log, with no traceback. One job, run once."""
    import subprocess
    import time

    from tests.test_cli import _slurm_ready

    if not _slurm_ready():
        pytest.fail("local Slurm is not up: run launch/slurm/local_cluster.sh start (make test does)")
    out = tmp_path / "job.out"
    epochs = 60  # 3 steps each (18 images, global batch 6): ~15 s per part at ~24 steps/s here
    r = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
         "--time=20", f"--output={out}", "--chdir", str(REPO), str(REPO / "launch/slurm/train.sbatch"), "demo",
         "--data.root", str(tiny_imagenet), "--data.backend", "torchvision", "--data.batch_size", "6",
         "--data.num_workers", "1", "--data.train_res", "32", "--data.val_res", "32",
         "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.max_epochs", str(epochs),
         "--trainer.log_every_n_steps", "1", "--run.root", str(tmp_path / "runs"), "--run.logger", "wandb"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "ZOO_HOME": str(REPO), "WANDB_SILENT": "true", "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    t0 = time.monotonic()
    timeline = []

    def mark(what):
        timeline.append(f"{time.monotonic() - t0:6.1f} s  {what}")

    try:
        run_dir = tmp_path / "runs" / "convnet" / f"slurm-{job}.0"
        # signal once epoch 1 runs: epoch 0's last.ckpt exists
        _wait(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), 300, f"job {job} does not train", poll=0.2)
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        mark("training epoch 1 (epoch 0's last.ckpt written); scancel --signal=USR1")
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        hpc = _wait(lambda: sorted(run_dir.glob("hpc_ckpt_*.ckpt")), 120, "no hpc checkpoint")[0]
        mark(f"{hpc.name} written")
        info = _wait(lambda: (j := _scontrol_job(job)).get("Restarts") == "1" and j.get("JobState") == "PENDING" and j,
                     120, "job not requeued", poll=0.5)
        mark(f"requeued: JobState=PENDING Restarts=1 Reason={info.get('Reason')} StartTime={info.get('StartTime')}")
        # Slurm holds a requeued job ~2 min (BeginTime); release it now to keep the suite short
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
        _wait(lambda: _scontrol_job(job).get("JobState") == "RUNNING", 180, "requeued job did not start")
        mark("running again (same job id)")
        info = _wait(lambda: (j := _scontrol_job(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                     and j, 420, "resumed job did not finish")
        mark(f"JobState={info['JobState']} ExitCode={info.get('ExitCode')}")
    finally:
        subprocess.run(["scancel", job], timeout=30)
        print("\n".join(["preemption timeline:", *timeline]))
    log = out.read_text(errors="replace")  # progress bars cut by the kill leave partial UTF-8
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])
    # the first part's log is still there, then the second part's
    assert f"zoo: job {job} restart 0" in log and f"zoo: job {job} restart 1" in log
    assert log.index("restart 0") < log.index("every rank stopped at step") < log.index(f"requeued Slurm job {job}") \
        < log.index("restart 1")
    assert f"Restoring states from the checkpoint path at {hpc}" in log, log[-4000:]
    assert "killed by signal" not in log, log[-4000:]  # DataLoader workers ignore SIGUSR1
    assert "Traceback" not in log and "Error" not in log, log[-4000:]  # the first part stopped cleanly
    assert "val/acc1: " in log
    # last.ckpt is the final epoch, and no last-v1.ckpt beside it
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == epochs - 1
    # one W&B run in two offline parts; the step goes on from the hpc checkpoint
    g = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    wid = (run_dir / WANDB_ID_FILE).read_text().strip()
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    same_id = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(wid)}(-\d+)?")  # "-1": same second
    assert [bool(same_id.fullmatch(p.name)) for p in parts] == [True, True], parts
    steps = []
    for part in parts:
        (run_file,) = part.glob("run-*.wandb")
        wait_complete(run_file)  # part 1 too: its W&B run was finished before the requeue
        assert wandb_file_run_id(run_file) == wid
        steps.append(sorted({row["trainer/global_step"] for row in history(run_file) if "train/loss_step" in row}))
    first, second = steps
    print(f"hpc checkpoint global_step {g}; W&B steps part 1 {first[0]}..{first[-1]}, part 2 {second[0]}..{second[-1]}")
    assert 3 < g < epochs * 3  # mid-training, after epoch 0
    # The ranks saved at the end of the batch that made step g, whose metrics part 1 logged
    # (as step g - 1) before it stopped; part 2 goes on with the next batch: nothing lost or repeated.
    assert steps == [list(range(0, g)), list(range(g, epochs * 3))], (g, steps)


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_on_two_nodes(tiny_imagenet, tmp_path):
    """train.sbatch on a two-node Slurm (two slurmd on this host, launch/slurm/local_two_nodes.sh):
    one task per node, Lightning's DDP over both nodes, one run directory, one checkpoint."""
    import subprocess

    if subprocess.run(["bash", str(REPO / "launch/slurm/local_two_nodes.sh"), "start"], capture_output=True,
                      timeout=120).returncode != 0:
        pytest.fail("the two-node local Slurm does not start: see /var/lib/slurm-zoo-two/log/")
    out = tmp_path / "job.out"
    env = {**os.environ, "ZOO_HOME": str(REPO), "SLURM_CONF": "/var/lib/slurm-zoo-two/slurm.conf",
           # the node names n1/n2 resolve nowhere: both "nodes" are this host
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    r = subprocess.run(
        ["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
         "--time=10", f"--output={out}", "--chdir", str(REPO), str(REPO / "launch/slurm/train.sbatch"), "demo",
         *tiny_data(tiny_imagenet, batch=6), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
         "--trainer.max_epochs", "1", "--run.root", str(tmp_path / "runs"), "--run.logger", "csv"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    log = out.read_text(errors="replace") if out.exists() else ""
    assert r.returncode == 0, (r.stderr, log[-3000:])
    job = r.stdout.strip().split()[-1]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert log.count("run directory:") == 1 and "val/acc1: " in log
    assert (tmp_path / "runs" / "convnet" / f"slurm-{job}.0" / "checkpoints" / "last.ckpt").is_file()


# ----------------------------------------------------------------------------- shared .beton cache


def _prepare_betons_racing(root: str, beton_dir: str, barrier, results) -> None:
    """One "node": wait for the other, then prepare_data() into the shared beton_dir."""
    import hashlib
    import json

    from datamodules import ffcv_io
    from datamodules.imagenet import ImageNetDataModule

    writes = []
    real_write = ffcv_io.write_beton

    def counting_write(*args, **kwargs):
        writes.append(str(args[1]))
        return real_write(*args, **kwargs)

    ffcv_io.write_beton = counting_write  # prepare_data imports it from the module on each call
    dm = ImageNetDataModule(root=root, backend="ffcv", beton_dir=beton_dir, progress=False, max_resolution=64)
    barrier.wait()
    dm.prepare_data()
    out = {}
    for split in ("train", "val"):
        p = dm.beton_path(split)
        out[split] = (os.stat(p).st_ino, hashlib.sha1(p.read_bytes()).hexdigest(),
                      json.loads(Path(f"{p}.json").read_text()))
    out["writes"] = writes
    results.put(out)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_nodes_writing_one_shared_beton_cache(tiny_imagenet, tmp_path):
    """Two processes (a node's local rank 0 each) prepare the same cache at the same moment:
    one writes, the other waits on the lock and then takes the finished file; both end with
    the same, valid file and sidecar."""
    import multiprocessing as mp

    from datamodules.ffcv_io import check_beton

    # fork: no second import of torch/ffcv (CPU only here); not a Pool: ffcv's writer starts processes
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_betons_racing, args=(str(tiny_imagenet), str(tmp_path), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    writes = [w for r in results for w in r["writes"]]
    assert len(writes) == 2 and len(set(writes)) == 2, writes  # each split written once, by one of them
    for split in ("train", "val"):
        (ino_a, sha_a, meta_a), (ino_b, sha_b, meta_b) = (r[split] for r in results)
        assert ino_a == ino_b and sha_a == sha_b and meta_a == meta_b
        assert meta_a["file_size"] == os.stat(next(tmp_path.glob(f"{split}*.beton"))).st_size
        path = next(tmp_path.glob(f"{split}*.beton"))
        assert check_beton(path, meta_a["params"])["num_samples"] == (18 if split == "train" else 9)
        assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- W&B dashboard


@pytest.mark.slow
def test_wandb_run_holds_the_dashboard(tiny_imagenet, tmp_path, capsys, monkeypatch):
    """A short offline run: readable LR names, throughput, the augmented-image grid, the confusion
    matrix and the confidently-wrong table are in the run file and its media folder."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.max_epochs", "2",
                 "--trainer.log_every_n_steps", "1", "--run.throughput_window", "2", "--model.lr", "1e-12",
                 "--run.root", str(tmp_path), "--run.logger", "wandb"]) == 0
    run_dir = _run_dir(capsys.readouterr().out)
    (part,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = part.glob("run-*.wandb")
    wait_complete(run_file)
    keys = set().union(*history(run_file))
    assert {"lr/backbone", "lr/head", "lr/backbone_no_decay", "lr/head_no_decay"} <= keys, sorted(keys)
    assert not any(k.startswith("lr-") for k in keys)
    assert {"train/device/samples_per_sec", "train/device/batches_per_sec", "train/device/flops_per_sec"} <= keys
    assert {"train/augmented_batch", "val/confusion_matrix", "val/confusion_table", "val/most_confident_wrong"} <= keys
    media = {p.relative_to(part / "files" / "media").parts[0:2] for p in (part / "files" / "media").rglob("*.*")}
    assert ("images", "train") in media and ("table", "val") in media, media
    assert (run_dir / "plots" / "train_augmented_batch.png").is_file()
    assert (run_dir / "plots" / "val_confusion_matrix.pt").is_file()


# ----------------------------------------------------------------------------- multi-node torchrun


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_two_nodes_on_localhost(tiny_imagenet, tmp_path):
    """launch/torchrun.sh's multi-node form, 2 "nodes" x 1 process on this host (gloo, CPU): one
    run directory (the id is agreed through the rendezvous store), one checkpoint, both trained."""
    import subprocess

    cmd = [str(REPO / "launch/torchrun.sh"), "--nnodes", "2", "--rdzv", f"127.0.0.1:{_free_port()}",
           "--rdzv-id", "t2n", "--rdzv-timeout", "120", "1", str(REPO / "launch/recipes/demo.yaml"),
           *tiny_data(tiny_imagenet, batch=6), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
           "--trainer.max_epochs", "1", "--run.root", str(tmp_path / "runs"), "--run.logger", "csv"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    both = "\n".join(outs)
    print("\n".join(line for line in both.splitlines() if line.startswith(("zoo: rank", "run directory"))))
    assert sorted(line.split()[2] for line in both.splitlines() if line.startswith("zoo: rank ")) == ["0", "1"]
    assert "rank 0 of 2" in both and "rank 1 of 2" in both
    assert both.count("run directory:") == 1 and "val/acc1: " in both
    (run_dir,) = (tmp_path / "runs" / "convnet").iterdir()  # both nodes agreed on one run directory
    assert [p.name for p in (run_dir / "checkpoints").glob("last*")] == ["last.ckpt"]


def test_torchrun_unreachable_rendezvous_is_one_line_after_the_timeout(tmp_path):
    import subprocess
    import time

    t0 = time.monotonic()
    # 192.0.2.1: TEST-NET-1 (RFC 5737), never routed
    r = subprocess.run([str(REPO / "launch/torchrun.sh"), "--nnodes", "2", "--rdzv", "192.0.2.1:29500",
                        "--rdzv-timeout", "3", "1", str(REPO / "launch/recipes/demo.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and time.monotonic() - t0 < 30
    assert r.stderr.strip().splitlines() == [
        "error: rendezvous endpoint 192.0.2.1:29500 not reachable after 3s: start this command on 192.0.2.1 first, "
        "or check the host name, the port and the firewall"]


# ----------------------------------------------------------------------------- make setup without root


def _fake_machine(finds: str) -> Path:
    """A copy of the Makefile in a world-writable temp dir, with stubs on PATH: apt-get and the
    venv's pip record their calls; pkg-config finds the modules listed in ``finds``."""
    import shutil
    import stat
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="zoo-make-", dir="/tmp"))
    shutil.copy(REPO / "Makefile", d / "Makefile")
    (d / "pyproject.toml").write_text("")
    bin_ = d / "bin"
    bin_.mkdir()
    stubs = {
        "apt-get": f'echo "$@" >> {d}/apt-calls',
        "pkg-config": f'[ "$1" = --exists ] && case " {finds} " in *" $2 "*) exit 0;; esac; exit 1',
        # `python3 -m venv .venv` makes a .venv/bin/python that records the pip calls
        "python3": f'mkdir -p .venv/bin; printf \'#!/bin/sh\\necho "$@" >> {d}/pip-calls\\n\' > .venv/bin/python; '
                   "chmod +x .venv/bin/python",
    }
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IRWXO)
    return d


def _make_setup(d: Path, user: str | None):
    import subprocess

    env = f"PATH={d}/bin:/usr/bin:/bin HOME={d}"
    cmd = f"cd {d} && env {env} make setup PYTHON={d}/bin/python3"
    argv = ["runuser", "-u", user, "--", "sh", "-c", cmd] if user else ["sh", "-c", cmd]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)




@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run make as another user")
def test_make_setup_without_root_never_calls_apt_get():
    import shutil

    # libraries found by pkg-config (conda-forge, modules): no apt-get, the [ffcv] extra
    d = _fake_machine(finds="opencv4 libturbojpeg")
    r = _make_setup(d, "nobody")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (d / "apt-calls").exists()
    assert '-e .[ffcv,dev,docs]' in (d / "pip-calls").read_text()
    shutil.rmtree(d)
    # libraries missing, no root: one line on what to install, no apt-get, install without ffcv
    d = _fake_machine(finds="")
    r = _make_setup(d, "nobody")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (d / "apt-calls").exists()
    hint = [line for line in r.stdout.splitlines() if line.startswith("ffcv needs")]
    assert len(hint) == 1 and "conda-forge opencv libjpeg-turbo pkg-config" in hint[0], r.stdout
    assert '-e .[dev,docs]' in (d / "pip-calls").read_text()
    shutil.rmtree(d)
    # root, one library missing: apt-get installs exactly that one
    d = _fake_machine(finds="libturbojpeg")
    r = _make_setup(d, None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (d / "apt-calls").read_text().splitlines() == ["update -qq", "install -y -qq libopencv-dev"]
    shutil.rmtree(d)
