"""The fork server (peer/lab/forkserver.py) starts what the tests start as a process of its own: its argv, working
directory, environment, session, stdout and stderr, exit code and thread count are those it asked for; it can be
signalled and waited on like a `subprocess.Popen`; and each child draws its own random numbers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peer import __version__
from peer.lab import forkserver
from peer.lab.harness import Procs, murmur

PROBE = """
import json, os, random, sys, time
import torch
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "probe": os.environ.get("PROBE"), "pid": os.getpid(),
                  "sid": os.getsid(0), "pgid": os.getpgid(0), "threads": torch.get_num_threads(),
                  "random": random.random(), "main": __name__}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "hang":
    time.sleep(120)
sys.exit(int(sys.argv[1]))
"""


def probe(procs: Procs, name: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict, object]:
    script = procs.workdir / "probe.py"
    script.write_text(PROBE)
    proc = procs.start(name, [sys.executable, str(script), *args], env=env)
    return json.loads(proc.wait_for(r"^\{.*\}$", timeout=90).group(0)), proc


@pytest.mark.timeout(120)
def test_a_forked_script_is_a_process_of_its_own(procs: Procs) -> None:
    if forkserver.shared_server() is None:
        pytest.skip("the fork server is off here (MURMUR_FORK_SERVER=0)")
    (procs.workdir / "elsewhere").mkdir()
    seen, proc = probe(procs, "one", "3", "x y", env={"PROBE": "yes", "OMP_NUM_THREADS": "1"})
    assert isinstance(proc.popen, forkserver.ForkedPopen)
    assert proc.wait_exit(60) == 3
    assert seen["argv"] == [str(procs.workdir / "probe.py"), "3", "x y"] and seen["main"] == "__main__"
    assert seen["cwd"] == str(procs.workdir) and seen["probe"] == "yes" and seen["threads"] == 1
    assert seen["pid"] == proc.popen.pid == seen["sid"] == seen["pgid"], "its own session and process group"
    assert proc.stderr_path.read_text().strip() == "to stderr"
    other, _ = probe(procs, "two", "0")
    assert other["random"] != seen["random"] and other["probe"] is None and other["threads"] >= 1


@pytest.mark.timeout(120)
def test_a_forked_process_is_signalled_and_waited_on_like_popen(procs: Procs) -> None:
    _, proc = probe(procs, "hang", "hang")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.popen.wait(0.3)
    assert proc.popen.poll() is None
    proc.popen.send_signal(signal.SIGKILL)
    assert proc.popen.wait(30) == -signal.SIGKILL and proc.popen.returncode == -signal.SIGKILL
    proc.popen.send_signal(signal.SIGTERM)  # after its exit: nothing, as Popen does


@pytest.mark.timeout(120)
def test_forked_murmur_commands_exit_as_the_entry_point_does(procs: Procs) -> None:
    version = procs.run("version", murmur("--version"))
    assert version.popen.returncode == 0 and version.lines == [f"murmur, version {__version__}"]
    bad = procs.run("bad", murmur("bootstrap", "--no-such-flag"))
    assert bad.popen.returncode == 2
    err = bad.stderr_path.read_text()
    assert "No such option '--no-such-flag'" in err and "Traceback" not in err


@pytest.mark.timeout(60)
def test_without_the_fork_server_processes_are_execd(tmp_path: Path) -> None:
    procs = Procs(tmp_path, fork=False)
    try:
        seen, proc = probe(procs, "exec", "0")
        assert isinstance(proc.popen, subprocess.Popen) and proc.wait_exit(60) == 0
        assert seen["pid"] == seen["sid"]
    finally:
        procs.stop_all()


def test_the_server_starts_murmur_and_scripts_also_inside_a_network_namespace() -> None:
    script = [sys.executable, "bench.py", "--x"]
    assert forkserver.forkable(murmur("run", "--swarm", "s")) == (None, murmur("run", "--swarm", "s"))
    assert forkserver.forkable(script) == (None, script)
    assert forkserver.forkable(["ip", "netns", "exec", "ns1", *murmur("bootstrap")]) == ("ns1", murmur("bootstrap"))
    for other in (["python3", "-c", "pass"], [sys.executable, "-c", "pass"], ["ip", "netns", "exec", "ns1", "ls"]):
        assert forkserver.forkable(other) is None, other
