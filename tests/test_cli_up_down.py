"""`boxoffice up` / `boxoffice down` as a user runs them: the default 3x3 topology."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SEED_EVENT = "a2d94b7c-5e3f-4a81-b6c2-7e8f9a0b1c02"
SEED_GA_TIER = "0a1b2c3d-0002-4000-8000-000000000203"


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:  # it exited while we walked the tree (a short-lived child)
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(proc.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _book(gateway: str, reference: str) -> dict:
    body = json.dumps({"eventId": SEED_EVENT, "clientReference": reference,
                       "items": [{"ticketTierId": SEED_GA_TIER, "quantity": 1}]}).encode()
    req = urllib.request.Request(f"{gateway}/api/bookings", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201
        return json.loads(resp.read())


CLI = [sys.executable, "-m", "deploy.cli"]

# `down` stops what `up` started whatever the topology: shown on the smallest one (one
# region, one shard, no second zone), the default topology being shown with Ctrl-C.
ONE_REGION_TOPOLOGY = """\
name: up-down-small
regions:
  solo: {location: "Solo"}
shards:
  shard-1: {home: solo, sync: "off"}
postgres: {durable: false}
"""


def _start_up(state_dir: Path, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`boxoffice up` in its own state directory, read until it says how to stop it."""
    env = dict(os.environ, BOXOFFICE_STATE_DIR=str(state_dir))
    up = subprocess.Popen([*CLI, "up", "--base-port", "0", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    assert up.stdout is not None
    for line in up.stdout:
        output.append(line.rstrip())
        if line.startswith("Stop with") or up.poll() is not None:
            break
    print("\n".join(output))
    return up, output


def _gateway_urls(output: list[str]) -> dict[str, str]:
    return dict(re.findall(r"^\s+([a-z]+(?:-[a-z]+)?)\s+(http://\S+)/$", "\n".join(output), re.M))


def _kill_if_running(up: subprocess.Popen[str]) -> None:
    if up.poll() is None:
        up.kill()
        up.wait()


def _assert_stopped_cleanly(up: subprocess.Popen[str], running: set[int], state_dir: Path) -> None:
    """`up` exited 0, and none of the processes it ran (nor any naming its state
    directory) is left."""
    assert up.returncode == 0
    left = [pid for pid in running if _alive(pid)]
    assert left == [], f"processes left behind: {left}"
    assert [p for p in _processes_mentioning(str(state_dir)) if _alive(p)] == []


@pytest.mark.timeout(240)
def test_up_serves_every_region_and_ctrl_c_leaves_nothing(workdir: Path) -> None:
    state_dir = workdir / "up-default"
    env = dict(os.environ, BOXOFFICE_STATE_DIR=str(state_dir))
    started = time.monotonic()
    up, output = _start_up(state_dir)
    try:
        assert up.stdout is not None
        print(f"boxoffice up: 3x3 cluster ready in {time.monotonic() - started:.1f}s")
        urls = {r: u for r, u in _gateway_urls(output).items() if r in ("us-east", "eu-west", "ap-south")}
        assert set(urls) == {"us-east", "eu-west", "ap-south"}, output

        running = _descendants(up.pid)
        # postgres servers (3 shards x 3 regions + a zone standby each), consul, node agents
        # and booking services (one per host: 3 regions + 3 second zones), gateways
        assert len(running) >= 12 + 1 + 6 + 6 + 3

        for region, url in urls.items():
            with urllib.request.urlopen(f"{url}/api/health", timeout=5) as resp:
                assert json.loads(resp.read()) == {"status": "ok", "region": region}
            booking = _book(url, f"cli-test-{region}")
            assert booking["eventId"] == SEED_EVENT

        shown = subprocess.run([*CLI, "map", "show"], env=env, capture_output=True, text=True,
                               timeout=30)
        assert shown.returncode == 0, shown.stderr
        for name in ("us-east", "eu-west", "ap-south", "shard-1", "shard-2", "shard-3", SEED_EVENT):
            assert name in shown.stdout
        # Every copy with its health check: 3 shards x (primary, zone standby, 2 replicas).
        assert shown.stdout.count("(ok)") == 12 and "FAILING" not in shown.stdout, shown.stdout

        # One process dying does not take the cluster down: `up` starts its own children
        # again (a gateway here), the node agents theirs (Postgres, booking services).
        gateway_pids = [p for p in running if _alive(p) and "gateway" in _cmdline(p)
                        and "us-east" in _cmdline(p)]
        assert len(gateway_pids) == 1
        os.kill(gateway_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        for line in up.stdout:
            output.append(line.rstrip())
            if "gateway[us-east] exited unexpectedly" in line or time.monotonic() > deadline:
                break
        assert up.poll() is None and any("gateway[us-east] exited" in line for line in output)
        while True:  # the restarted gateway is ready again (its region map loaded)
            try:
                with urllib.request.urlopen(f"{urls['us-east']}/api/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the gateway was not started again"
            time.sleep(0.05)  # poll interval
        _book(urls["us-east"], f"cli-test-again-{time.monotonic_ns()}")
        status = subprocess.run([*CLI, "status"], env=env, capture_output=True, text=True, timeout=30)
        print(status.stdout)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("postgres ") == 12 and status.stdout.count("booking service") == 6
        running = _descendants(up.pid)
        up.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        up.wait(timeout=60)
    finally:
        _kill_if_running(up)
    _assert_stopped_cleanly(up, running, state_dir)


@pytest.mark.timeout(120)
def test_down_stops_what_up_started_and_leaves_nothing(workdir: Path) -> None:
    state_dir = workdir / "up-small"
    topology = workdir / "up-down-small.yaml"
    topology.write_text(ONE_REGION_TOPOLOGY)
    env = dict(os.environ, BOXOFFICE_STATE_DIR=str(state_dir))
    up, output = _start_up(state_dir, "--topology", str(topology))
    try:
        urls = _gateway_urls(output)
        assert set(urls) == {"solo"}, output
        with urllib.request.urlopen(f"{urls['solo']}/api/health", timeout=5) as resp:
            assert json.loads(resp.read()) == {"status": "ok", "region": "solo"}
        assert _book(urls["solo"], f"cli-down-{time.monotonic_ns()}")["eventId"] == SEED_EVENT
        running = _descendants(up.pid)
        # postgres, consul, the node agent, the booking service and the gateway at least
        assert len(running) >= 5
        down = subprocess.run([*CLI, "down"], env=env, capture_output=True, text=True, timeout=90)
        assert down.returncode == 0, down.stdout + down.stderr
        up.wait(timeout=60)
    finally:
        _kill_if_running(up)
    _assert_stopped_cleanly(up, running, state_dir)


def test_up_never_wipes_a_directory_it_did_not_make(workdir: Path) -> None:
    from deploy.cluster import Cluster
    from deploy.topology import parse_topology
    from tests.conftest import SMALL_TOPOLOGY

    foreign = workdir / "someone-elses-dir"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="not made by boxoffice"):
        Cluster(parse_topology(SMALL_TOPOLOGY), foreign).start()
    assert (foreign / "precious.txt").read_text() == "keep me"
