"""OpenMP wait policy: the server's idle OpenMP threads sleep instead of spinning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.openmp import WAIT_VARIABLES, prefer_passive_waiting

# 200 short parallel torch ops, each followed by a 2 ms pause of the calling thread: prints the process's
# CPU seconds per wall second over the loop. Spinning OpenMP workers burn their core through every pause.
PROBE = """
import sys, time
from service.openmp import prefer_passive_waiting
applied = prefer_passive_waiting() if sys.argv[1] == "passive" else False
import os, torch
torch.set_num_threads(2)
x = torch.zeros(400_000)
for _ in range(20):
    x.add_(1.0)
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(200):
    x.add_(1.0)
    time.sleep(0.002)
print(applied, os.environ.get("OMP_WAIT_POLICY"), (time.process_time() - cpu) / (time.perf_counter() - wall))
"""


def run_probe(mode: str, **env: str) -> tuple[bool, str, float]:
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", out[1], float(out[2])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for two OpenMP threads")
def test_passive_waiting_stops_idle_threads_from_spinning():
    applied, policy, passive_share = run_probe("passive")
    untouched, default_policy, default_share = run_probe("default")
    assert applied and policy == "PASSIVE"
    assert not untouched and default_policy == "None"
    assert default_share > 0.6  # a worker spins through the pauses: about one core busy
    assert passive_share < 0.4 and passive_share < default_share / 2


def test_the_operators_choice_is_kept():
    applied, policy, _ = run_probe("passive", OMP_WAIT_POLICY="ACTIVE")
    assert not applied and policy == "ACTIVE"
    applied, policy, _ = run_probe("passive", GOMP_SPINCOUNT="1000")
    assert not applied and policy == "None"


def test_too_late_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401  (the test process has imported it long ago; made explicit here)

    for name in WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert prefer_passive_waiting() is False
    assert "OMP_WAIT_POLICY" not in os.environ


def test_camserve_serve_sets_the_policy_before_torch_loads():
    probe = (
        "import os, sys, uvicorn\n"
        "from service.cli import main\n"
        "uvicorn.Server.run = lambda self: print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
        "main(['serve'])\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    out = subprocess.run([sys.executable, "-c", probe], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "True"]  # set before the app imported torch (else left unset)
