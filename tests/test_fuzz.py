"""A short run of each fuzzing target of scripts/fuzz (the long run, 100,000
cases a target, is by hand: docs/reliability.md): every hostile input
answered or refused, no exception out of the server or the client's codec,
no hang, no damaged device stream accepted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("target", ["server", "client", "stream"])
def test_a_short_fuzzing_run_finds_nothing(target):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts/fuzz"), "--target", target, "--cases", "300",
                           "--seed", "1000"], capture_output=True, text=True, timeout=300, env=env)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], json.dumps(result, indent=1) + done.stderr[-2000:]
    stats = result[target]
    assert stats["cases"] == 300 and stats["failure_count"] == 0
    if target == "server":
        assert stats["error_replies"] > 0 and stats["replies"] > 0, stats
    elif target == "stream":
        assert stats["damaged"] > 0 and stats["refused"] == stats["damaged"], stats
    else:
        assert stats["bad"] > 0, stats
