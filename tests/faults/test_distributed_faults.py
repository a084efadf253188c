"""Faults injected into a 2-process torchrun run (gloo on CPU): one rank stopped with SIGSTOP in the
middle of training. The other must not wait gloo's 30 minutes in silence: after ``train.timeout``
seconds the job ends with a non-zero exit and a message naming the rank that did not arrive. Also a
timeout in the environment (``NONLOCALNET_TIMEOUT``) that is not a number of seconds, and a rank
still busy when the others reach the end of the session.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .faultkit import tiny_overrides
from nonlocalnet import distributed


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state: the parent
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    return int(values[b"RANK"]) if b"RANK" in values else None


def _state(pid: int) -> str:
    """The process state letter (R, S, T, Z...); "" once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {seconds} s")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc (Linux)")
def test_a_stopped_rank_is_named_within_the_timeout(tiny_set, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(distributed.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("NONLOCALNET_TIMEOUT", None)
    overrides = tiny_overrides(tiny_set, **{"train.timeout": 20, "optim.iterations": 2000, "optim.steps": "[1000]",
                                            "train.checkpoint_every": 1000})
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:  # a file, not a pipe nobody reads while the job runs
        job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "-m", "nonlocalnet", "train", "--out", str(out), "--set", *overrides],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file)
    stopped = None
    try:
        ranks = _wait_for(lambda: {_rank_of(p): p for p in _children(job.pid) if _rank_of(p) is not None}
                          if len(_children(job.pid)) == 2 else None, 120, "two workers started")
        _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 3,
                  180, "training logged three steps")
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        _wait_for(lambda: _state(ranks[0]) in ("", "Z"), 90, "rank 0 ended")
        reported = time.monotonic() - start
        job.wait(timeout=120)  # torchrun then ends the stopped rank (SIGTERM, SIGKILL 30 s later)
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if job.poll() is None:
            job.kill()
            job.wait()
    stderr = log.read_text()
    assert job.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("nonlocalnet train: error:")]
    assert any("rank 1 did not reach the collective operation within 20 s" in line for line in lines), stderr[-3000:]
    assert reported < 45, (reported, stderr[-2000:])  # 20 s timeout, 10 s for the others' notes; gloo's was 30 min


@pytest.mark.parametrize("text", ["soon", "0", "-5", "inf"])
def test_a_bad_timeout_in_the_environment_is_named(monkeypatch, text):
    monkeypatch.setenv("NONLOCALNET_TIMEOUT", text)
    with pytest.raises(ValueError, match=f"NONLOCALNET_TIMEOUT: expected seconds > 0, got '{text}'"):
        distributed._timeout(20)
    monkeypatch.setenv("NONLOCALNET_TIMEOUT", "45")
    assert distributed._timeout(20) == 45.0  # the environment overrides the config
    monkeypatch.delenv("NONLOCALNET_TIMEOUT")
    assert distributed._timeout(20) == 20.0 and distributed._timeout(None) == distributed.DEFAULT_TIMEOUT


@pytest.mark.slow
def test_a_rank_late_at_the_end_is_named_by_the_barrier(tmp_path):
    script = tmp_path / "late.py"
    script.write_text("import sys, time\n"
                      "from nonlocalnet import distributed\n"
                      "from nonlocalnet.cli import error_message\n"
                      "try:\n"
                      "    with distributed.session(timeout=5):\n"
                      "        if distributed.rank() == 1:\n"
                      "            time.sleep(60)  # still busy when rank 0 reaches the end\n"
                      "except Exception as err:\n"
                      "    print(f'rank {distributed.rank()}: {error_message(err)}', file=sys.stderr)\n"
                      "    sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(distributed.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("NONLOCALNET_TIMEOUT", None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 50
    assert "rank 0: rank 1 did not reach the end of the run within 5 s" in done.stderr, done.stderr[-3000:]
