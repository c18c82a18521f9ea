"""Real process kills and divergence (issue 18, items 2 and 3): a SIGKILLed `train.py adapter` resumes to the
weights of an uninterrupted run, bit for bit; SIGTERM / SIGINT end the step, save last.pt and say how to resume;
a NaN / inf loss or gradient stops `fit` before the update, naming the step and the last good checkpoint."""
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import loop
import train
from conftest import MICRO, ROOT

# Long enough 3a / 3b phases (~5 ms a step) that a signal sent when the first last.pt appears lands mid-run.
LONG = [*MICRO, "--align_steps=300", "--steps=300"]
ENV = {**os.environ, "PYTHONPATH": ROOT}   # the same threads as this process: the same float rounding


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of LONG: its folder (the pre-trained stages are copied from it, not trained again)."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    train.main(["adapter", f"--out_dir={out}", *LONG])
    return out


def _start(reference, out, wait_for):
    """`train.py adapter` in a new process on a copy of reference's pre-trained stages, once `wait_for` exists;
    its stdout and stderr go to out/stdout.txt and out/stderr.txt (a pipe could fill up and block it)."""
    os.makedirs(out)
    for f in ("mel.pt", "config.json"):
        shutil.copy(os.path.join(reference, f), out)
    for d in ("encoder", "llm"):
        shutil.copytree(os.path.join(reference, d), os.path.join(out, d))
    with open(os.path.join(out, "stdout.txt"), "w") as o, open(os.path.join(out, "stderr.txt"), "w") as e:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "adapter", f"--out_dir={out}",
                                 *LONG], env=ENV, stdout=o, stderr=e)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, wait_for)):
        assert proc.poll() is None and time.time() < deadline, Path(out, "stderr.txt").read_text()
        time.sleep(0.005)
    return proc


def _assert_same_weights(a_dir, b_dir):
    for f in ("moe-s0/align/best.pt", "moe-s0/last.pt", "moe-s0/best.pt"):
        a, b = loop.load(os.path.join(a_dir, f)), loop.load(os.path.join(b_dir, f))
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and a, f
        for part in a:
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (f, part, k)


def test_sigkill_after_a_checkpoint_then_resume_gives_the_uninterrupted_weights(reference, tmp_path):
    out = str(tmp_path / "killed")
    proc = _start(reference, out, "moe-s0/align/last.pt")
    time.sleep(random.uniform(0, 0.2))                   # a (seeded) random step after the first checkpoint
    proc.kill()
    assert proc.wait() == -signal.SIGKILL                # killed, not finished
    assert not os.path.exists(os.path.join(out, "moe-s0", "summary.json"))
    assert 3 <= loop.load(os.path.join(out, "moe-s0", "align", "last.pt"))["step"] < 300
    train.main(["adapter", "--resume", f"--out_dir={out}", *LONG])
    _assert_same_weights(reference, out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_sigterm_and_sigint_end_the_step_save_last_pt_and_say_how_to_resume(reference, tmp_path, sig):
    out = str(tmp_path / "stopped")
    proc = _start(reference, out, "moe-s0/last.pt")      # in 3b, after its first checkpoint
    proc.send_signal(sig)
    proc.wait(timeout=60)
    stderr = Path(out, "stderr.txt").read_text()
    assert proc.returncode == 128 + sig, stderr
    assert "--resume" in stderr and "moe s0: stopped by signal" in stderr
    ck = loop.load(os.path.join(out, "moe-s0", "last.pt"))   # written atomically: loadable, the step it ended
    assert f"after step {ck['step']}," in stderr and ck["step"] < 300
    assert not [f for f in os.listdir(os.path.join(out, "moe-s0")) if ".tmp" in f]
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "adapter", "--resume", f"--out_dir={out}", *LONG],
                   env=ENV, check=True, capture_output=True)
    _assert_same_weights(reference, out)


# --- fit on a toy model: y = w x + b by least squares, checkpoints every 2 steps

def _toy_fit(tmp_path, step_hook, steps=8, resume=False):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def step_loss(m, step, idx):
        loss = ((m(x[idx]) - y[idx]) ** 2).mean()
        return step_hook(m, step, loss), dict(mse=float(loss.detach()))
    validate = torch.no_grad()(lambda: float(((model(x) - y) ** 2).mean()))
    state = lambda: {k: v.clone() for k, v in model.state_dict().items()}
    return loop.fit("toy", model, step_loss, loop.Schedule(steps, 4, 0.1, warmup=1), loop.Ctx(torch.device("cpu")),
                    str(tmp_path), resume, 0, 16, state, model.load_state_dict, validate=validate, eval_every=2,
                    verbose=False)


def _nan_if(k, how):
    def hook(m, step, loss):
        if step != k:
            return loss
        if how == "grad":                                # a finite loss, a NaN gradient: d sqrt(u) / du at u = 0
            return loss + 0 * torch.sqrt(m.weight - m.weight.detach()).sum()
        return loss * {"nan": math.nan, "inf": math.inf}[how]
    return hook


@pytest.mark.parametrize("how", ["nan", "inf", "grad"])
@pytest.mark.parametrize("k", [0, 5])
def test_a_non_finite_loss_or_gradient_stops_before_the_update_and_names_the_last_good_checkpoint(tmp_path, k, how):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        _toy_fit(tmp_path, _nan_if(k, how))
    # Steps are counted from 1 as in the log: step index k (0-based, as step_loss sees it) is step k + 1.
    last = os.path.join(tmp_path, "last.pt")
    assert f"toy: the loss or gradient norm of step {k + 1} is" in str(e.value)
    assert str(e.value).endswith(last if k else "none yet")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    if k:                                                # checkpoints of steps 2 and 4, nothing of step 6
        ck, best = loop.load(last), loop.load(os.path.join(tmp_path, "best.pt"))
        assert ck["step"] == 4 and math.isfinite(ck["best"])
        for t in [*ck["model"].values(), *best.values()]:
            assert torch.isfinite(t).all()
        for group in ck["optimizer"]["state"].values():
            assert all(torch.isfinite(v).all() for v in group.values())
    else:
        assert not os.path.exists(last) and not os.path.exists(os.path.join(tmp_path, "best.pt"))


def test_a_signal_in_process_ends_the_step_then_saves_and_resumes_exactly(tmp_path):
    """SIGTERM during step index 2 (0-based): step 3 completes, last.pt holds 3 steps (not a multiple of 2)."""
    def term_at_2(m, step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    with pytest.raises(SystemExit) as e:
        _toy_fit(tmp_path / "cut", term_at_2)
    assert e.value.code == 128 + signal.SIGTERM and loop.load(os.path.join(tmp_path, "cut", "last.pt"))["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    _toy_fit(tmp_path / "cut", lambda m, step, loss: loss, resume=True)
    _toy_fit(tmp_path / "full", lambda m, step, loss: loss)
    a, b = (loop.load(os.path.join(tmp_path, d, "last.pt")) for d in ("cut", "full"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_and_resume_exact(tmp_path):
    """The 3rd last.pt write (step 6) goes to /dev/full, a real ENOSPC: the run stops with an error naming the file,
    last.pt still holds step 4, no temp file is left, and --resume ends where an uninterrupted run does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    tmp = tmp_path / "cut" / f"last.pt.tmp{os.getpid()}"

    def disk_full_at_5(m, step, loss):
        if step == 5:
            os.symlink("/dev/full", tmp)
        return loss
    with pytest.raises(SystemExit, match=r"last.pt: writing failed .* MiB free there\); the previous file is intact"):
        _toy_fit(tmp_path / "cut", disk_full_at_5)
    assert loop.load(os.path.join(tmp_path, "cut", "last.pt"))["step"] == 4
    assert not os.path.lexists(tmp) and not [f for f in os.listdir(tmp_path / "cut") if ".tmp" in f]
    _toy_fit(tmp_path / "cut", lambda m, step, loss: loss, resume=True)
    _toy_fit(tmp_path / "full", lambda m, step, loss: loss)
    a, b = (loop.load(os.path.join(tmp_path, d, "last.pt")) for d in ("cut", "full"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_an_out_dir_in_use_by_a_live_run_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    out = str(tmp_path / "shared")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, torch, loop\n"
                               "with loop.out_dir_lock(sys.argv[1], loop.Ctx(torch.device('cpu'))):\n"
                               "    print('locked', flush=True); time.sleep(120)", out],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"--out_dir={out} is in use by a live run \(pid {holder.pid}\)"):
            train.main(["adapter", f"--out_dir={out}", *MICRO])
        assert os.listdir(out) == [".lock"]                   # refused before any work
        cli = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}"], env=ENV,
                             capture_output=True, text=True)
        assert cli.returncode == 2 and cli.stderr.startswith("error: --out_dir=") and cli.stderr.count("\n") == 1
    finally:
        holder.kill()
    assert holder.wait() == -signal.SIGKILL
    with loop.out_dir_lock(out, loop.Ctx(torch.device("cpu"))):   # the kernel dropped the dead run's lock
        assert Path(out, ".lock").read_text() == f"{os.getpid()}\n"


# --- Every other stage that trains: SIGKILL after its first checkpoint, --resume, the same final weights
MOA = ["--bench_clips=100", "--pre_clips=100", "--ast_d=16", "--ast_layers=2", "--ast_heads=2", "--ast_ff=32",
       "--batch=8", "--pre_batch=8", "--benchmarks=esc50", "--methods=soft-pfeiffer", "--seeds=1",
       "--evaluate=false", "--pre_epochs=40", "--epochs=1"]
STAGES = {   # name: (script and arguments, the checkpoint to wait for, the stage's final files)
    "encoder": (["train.py", "encoder", *MICRO, "--enc_steps=400"], "encoder/last.pt", ["encoder/encoder.pt"]),
    "llm": (["train.py", "llm", *MICRO, "--llm_steps=400"], "llm/last.pt", ["llm/llm.pt"]),
    "ast": (["train_moa.py", *MOA], "ast/last.pt", ["ast/ast.pt", "esc50/soft-pfeiffer-s0/best.pt"]),
}


def _tensors(ck):
    return {k: v for k, v in ck.items() if torch.is_tensor(v)} | {
        f"{k}.{j}": w for k, v in ck.items() if isinstance(v, dict) for j, w in _tensors(v).items()}


@pytest.mark.parametrize("stage", ["encoder", pytest.param("llm", marks=pytest.mark.slow),
                                   pytest.param("ast", marks=pytest.mark.slow)])
def test_every_training_stage_resumes_a_sigkill_to_the_uninterrupted_weights(tmp_path, stage):
    argv, wait_for, finals = STAGES[stage]
    run = lambda out, *extra: subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:],
                                              f"--out_dir={out}", *extra], env=ENV, check=True, capture_output=True)
    run(tmp_path / "whole")
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:], f"--out_dir={cut}"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(cut / wait_for):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    time.sleep(random.uniform(0, 0.1))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL and not os.path.exists(cut / finals[0])
    step = loop.load(cut / wait_for)["step"]
    assert f"{stage}: resuming at step {step} from" in run(cut, "--resume").stdout.decode()   # not from scratch
    for f in finals:
        a, b = _tensors(loop.load(tmp_path / "whole" / f)), _tensors(loop.load(cut / f))
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.slow
def test_under_torchrun_a_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """Only rank 1 is signalled: the all-reduced stop flag ends both ranks after one step, rank 0 writes last.pt."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "adapter", f"--out_dir={out}", *LONG]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
    deadline = time.time() + 240
    while not os.path.exists(out / "moe-s0" / "last.pt"):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()
        time.sleep(0.01)
    def ppid_and_env(p):
        try:
            return int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]), Path(f"/proc/{p}/environ").read_bytes()
        except (OSError, ValueError, IndexError):
            return None, b""
    rank1 = [int(p) for p in os.listdir("/proc") if p.isdigit() and (pe := ppid_and_env(p))[0] == proc.pid
             and b"\0RANK=1\0" in b"\0" + pe[1]]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    text = (tmp_path / "log.txt").read_text()
    done = loop.load(out / "moe-s0" / "last.pt")["step"]
    assert f"moe s0: stopped by signal {int(signal.SIGTERM)} after step {done}," in text, text[-3000:]
    assert done < 300
