"""The topology's owner with real worker processes: restart rules, giving up, telling the feeder."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from wanwu.errors import StageError
from wanwu.pipeline.config import JobConfig, PipelineConfig
from wanwu.pipeline.topology import transport
from wanwu.pipeline.topology.messages import EventKind, Lost
from wanwu.pipeline.topology.owner import RestartPolicy, Topology
from wanwu.pipeline.topology.plan import make_plan
from wanwu.stages.models.base import get_model_spec

MODEL = get_model_spec("efficientnet_lite0")


def wait_ready(topology: Topology, names: list[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(topology.positions[n].ready for n in names):
        assert time.monotonic() < deadline, f"not ready: {[n for n in names if not topology.ready(n)]}"
        topology.poll(50)
        assert topology.supervise() is None


def supervise_until_restart(topology: Topology, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        topology.poll(20)
        restart = topology.supervise()
        if restart is not None:
            return restart
    raise AssertionError("nothing was restarted")


def kill(topology: Topology, name: str) -> int:
    pid = topology.pids()[name]
    os.kill(pid, signal.SIGKILL)
    while topology.positions[name].alive():
        time.sleep(0.01)
    return pid


@pytest.fixture
def decoders():
    cfg = PipelineConfig(decoders=2)
    topology = Topology(cfg, make_plan(cfg, MODEL), [("decoder", 0), ("decoder", 1)],
                        RestartPolicy(max_backoff_s=1.0))
    listener = transport.socket(topology.ctx, zmq.SUB, topology.endpoints.control, bind=False)
    topology.start()
    yield topology, listener
    topology.stop(10)
    topology.close()
    assert not Path(topology.job_dir).exists()


def test_a_dead_decoder_is_restarted_alone_one_generation_on_and_the_feeder_told(decoders):
    topology, listener = decoders
    wait_ready(topology, ["decoder-0", "decoder-1"])
    other = topology.pids()["decoder-1"]
    kill(topology, "decoder-0")
    restart = supervise_until_restart(topology)
    assert restart.names == ("decoder-0",) and restart.dead == ((0, 0),) and not restart.everything
    assert restart.generations == ((0, 1),) and topology.positions["decoder-0"].spec.generation == 1
    assert topology.pids()["decoder-1"] == other  # the other decoder lives on
    assert listener.poll(5000)
    msg, _ = transport.recv(listener)
    assert msg == Lost(((0, 0),), False, ((0, 1),))
    wait_ready(topology, ["decoder-0"])


def test_quick_repeated_deaths_wait_before_the_restart(decoders):
    topology, _ = decoders
    wait_ready(topology, ["decoder-0", "decoder-1"])
    kill(topology, "decoder-1")
    supervise_until_restart(topology)  # the first death: at once
    wait_ready(topology, ["decoder-1"])
    kill(topology, "decoder-1")
    died = time.monotonic()
    restart = supervise_until_restart(topology)
    assert restart.names == ("decoder-1",) and time.monotonic() - died >= 0.45  # backed off
    assert topology.restarts == 2


def test_a_worker_that_dies_before_it_was_ever_ready_ends_everything_with_its_reason():
    cfg = PipelineConfig(decoders=1, decoder="no-such-decoder")
    topology = Topology(cfg, make_plan(PipelineConfig(decoders=1), MODEL), [("decoder", 0)])
    try:
        topology.start()
        with pytest.raises(StageError, match=r"decoder-0: ConfigError: unknown decoder 'no-such-decoder'.*before it was ready"):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                events = topology.poll(50)
                assert all(e.kind is not EventKind.READY for e in events)
                topology.supervise()
    finally:
        topology.stop(10)
        topology.close()


def test_the_death_of_a_worker_that_is_not_restarted_fails_the_job(tmp_path):
    cfg = JobConfig(inputs=(str(tmp_path),), out=str(tmp_path / "r.jsonl"), decoders=1)
    topology = Topology(cfg, make_plan(cfg, MODEL), [("sink", 0)])
    try:
        topology.start(out=cfg.out)
        wait_ready(topology, ["sink"])
        kill(topology, "sink")
        with pytest.raises(StageError, match=r"sink: the process died \(pid \d+, exit status -9\)"):
            topology.supervise()
    finally:
        topology.stop(10)
        topology.close()


@pytest.mark.slow
def test_a_dead_inference_process_restarts_every_producer():
    cfg = PipelineConfig(decoders=1)
    topology = Topology(cfg, make_plan(cfg, MODEL), [("inference", 0), ("decoder", 0)])
    try:
        topology.start()
        wait_ready(topology, ["inference", "decoder-0"])
        decoder = topology.pids()["decoder-0"]
        kill(topology, "inference")
        restart = supervise_until_restart(topology)
        assert set(restart.names) == {"inference", "decoder-0"} and restart.everything
        assert restart.dead == ((0, 0),) and restart.generations == ((0, 1),)
        assert topology.pids()["decoder-0"] != decoder
        wait_ready(topology, ["inference", "decoder-0"])
    finally:
        topology.stop(10)
        topology.close()


def run_owner_script(code: str, tmp_path: Path, timeout_s: float = 120) -> tuple[int, str, str]:
    """Run ``code`` in a child Python; its output goes to files, so a worker that outlives the
    child cannot hold a pipe open and hang the test (it is found by the assertions instead)."""
    import subprocess
    import sys

    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        code_ = subprocess.run([sys.executable, "-c", code], stdout=o, stderr=e, timeout=timeout_s).returncode
    return code_, out.read_text(), err.read_text()


def test_a_replacement_that_cannot_be_spawned_is_tried_again_later(tmp_path):
    """Out of file descriptors (EMFILE), spawning the replacement fails: the topology says so and
    tries again once descriptors are free, instead of dying (run in a child, whose limit we lower)."""
    import textwrap

    code = textwrap.dedent("""
        import os, resource, signal, time
        from wanwu.pipeline.config import PipelineConfig
        from wanwu.pipeline.topology.owner import RestartPolicy, Topology
        from wanwu.pipeline.topology.plan import make_plan
        from wanwu.stages.models.base import get_model_spec

        def exhaust():
            # Take every free descriptor below the limit. Lowering the limit to the count of open
            # descriptors is not enough: ZeroMQ's I/O thread may close some (the dead decoder's
            # connection), leaving holes below the limit that a spawn would happen to fit in.
            taken = []
            while True:
                try:
                    taken.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    return taken

        cfg = PipelineConfig(decoders=1)
        topology = Topology(cfg, make_plan(cfg, get_model_spec()), [("decoder", 0)], RestartPolicy(max_backoff_s=1))
        try:
            topology.start()
            while not topology.ready("decoder-0"):
                topology.poll(50)
            print("pid", topology.pids()["decoder-0"], flush=True)
            os.kill(topology.pids()["decoder-0"], signal.SIGKILL)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
            taken = []
            deadline = time.monotonic() + 20
            while topology.spawn_failures == 0 and time.monotonic() < deadline:
                topology.poll(20)
                taken += exhaust()  # not one descriptor to spare when supervise spawns
                restart = topology.supervise()  # no exception: the death is reported, nothing restarted yet
                assert restart is None or (restart.names == () and restart.dead == ((0, 0),)), restart
            assert topology.spawn_failures >= 1 and not topology.ready("decoder-0"), topology.spawn_failures
            for fd in taken:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            while not topology.ready("decoder-0") and time.monotonic() < deadline + 30:
                topology.poll(20)
                topology.supervise()
            print("recovered" if topology.ready("decoder-0") else "not recovered", topology.spawn_failures)
            print("pid", topology.pids()["decoder-0"], flush=True)
        finally:
            topology.stop(10)
            topology.close()
    """)
    returncode, stdout, stderr = run_owner_script(code, tmp_path)
    assert returncode == 0, stderr[-3000:]
    assert "recovered" in stdout.splitlines()[1], stdout + stderr[-2000:]
    for line in stdout.splitlines():
        if line.startswith("pid "):
            assert_gone(int(line.split()[1]))


def assert_gone(pid: int, timeout_s: float = 15) -> None:
    """The process ``pid`` has exited (a zombie counts: it runs no more)."""
    from conftest import proc_state  # "Z" once it is gone, too

    deadline = time.monotonic() + timeout_s
    while True:
        state = proc_state(pid)
        if state in ("Z", "X"):
            return
        assert time.monotonic() < deadline, f"process {pid} outlived its owner (state {state})"
        time.sleep(0.1)


def test_an_owner_that_dies_while_its_workers_start_leaves_no_orphans(tmp_path):
    """The owner is killed right after spawning, before its workers could ask Linux for a death
    signal: they must notice they were orphaned and exit, not wait forever under init."""
    import textwrap

    code = textwrap.dedent("""
        import os
        from wanwu.pipeline.config import PipelineConfig
        from wanwu.pipeline.topology.owner import RestartPolicy, Topology
        from wanwu.pipeline.topology.plan import make_plan
        from wanwu.stages.models.base import get_model_spec

        cfg = PipelineConfig(decoders=2)
        topology = Topology(cfg, make_plan(cfg, get_model_spec()), [("decoder", 0), ("decoder", 1)], RestartPolicy())
        topology.start()
        for pid in topology.pids().values():
            print("pid", pid, flush=True)
        os.kill(os.getpid(), 9)  # as kill -9 would, while the workers still import their modules
    """)
    returncode, stdout, stderr = run_owner_script(code, tmp_path)
    assert returncode == -9, stderr[-3000:]
    pids = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("pid ")]
    assert len(pids) == 2, stdout
    for pid in pids:
        assert_gone(pid)
