"""``qmpmig check`` against real ``qmpmig-device`` processes: the reference
device passes every rule that applies to it, for each v2 flag set and for
v1, and each debug defect fails exactly the rule that names it."""

import json
import subprocess
import sys

import pytest

from qmpmig.tools import check

#: Small and quick: 1 MiB of state, a DMA engine fast enough to see in 0.3 s.
FAST = ("--state-size", "1M", "--dma-rate", "2000")
V1_RULES = {r.id for r in check.RULES if "v1" in r.needs}
V2_RULES = {r.id for r in check.RULES if "v2" in r.needs}
QUIESCE_RULES = {r.id for r in check.RULES if "quiesce" in r.needs}
PEER_RULES = {r.id for r in check.RULES if "peer" in r.needs}


def by_status(results: list[check.Result]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {check.PASS: set(), check.FAIL: set(), check.SKIP: set()}
    for r in results:
        out[r.status].add(r.id)
    return out


def test_the_table_is_well_formed():
    ids = [r.id for r in check.RULES]
    assert len(ids) == len(set(ids))
    for r in check.RULES:
        assert r.text and r.source and set(r.needs) <= set(check.NEEDS), r


@pytest.mark.parametrize("flags", ["STOP_COPY", "STOP_COPY,P2P", "STOP_COPY,PRE_COPY", "STOP_COPY,P2P,PRE_COPY"])
async def test_reference_device_passes_v2(spawn_device, flags):
    dev = spawn_device(*FAST, "--mig-flags", flags, name="dev")
    peer = spawn_device(*FAST, "--mig-flags", flags, name="peer")
    results = await check.run(str(dev.socket), str(peer.socket))
    seen = by_status(results)
    skipped = V1_RULES | (set() if "P2P" in flags else QUIESCE_RULES)
    assert seen[check.FAIL] == set(), [r for r in results if r.status == check.FAIL]
    assert seen[check.SKIP] == skipped
    details = {r.id: r.detail for r in results}
    assert "state hashes equal" in details["peer-resume"]
    assert ("with pre-copy" in details["peer-resume"]) == ("PRE_COPY" in flags)
    assert "ERROR via a corrupt resume" in details["reset"]


@pytest.mark.parametrize("ndma", [True, False])
async def test_reference_device_passes_v1(spawn_device, ndma):
    options = (*FAST, "--migration", "v1", *(() if ndma else ("--no-ndma",)))
    dev = spawn_device(*options, name="dev")
    peer = spawn_device(*options, name="peer")
    results = await check.run(str(dev.socket), str(peer.socket))
    seen = by_status(results)
    assert seen[check.FAIL] == set(), [r for r in results if r.status == check.FAIL]
    assert seen[check.SKIP] == V2_RULES | (set() if ndma else QUIESCE_RULES)
    details = {r.id: r.detail for r in results}
    assert ("NDMA taken" if ndma else "NDMA not taken") in details["v1-device-state"]


@pytest.mark.parametrize("options,rule,named", [
    (("--defect", "accept-illegal-arc"), "v2-refused", "STOP_COPY -> PRE_COPY: accepted"),
    (("--migration", "v1", "--defect", "data-size-changes"), "v1-iteration-stable", "data_size"),
    (("--defect", "dma-in-ndma"), "ref-quiesce", "dma_seq went"),
])
async def test_each_defect_fails_its_rule(spawn_device, options, rule, named):
    dev = spawn_device(*FAST, *options)
    results = await check.run(str(dev.socket))
    seen = by_status(results)
    assert seen[check.FAIL] == {rule}
    assert PEER_RULES <= seen[check.SKIP]
    detail = next(r.detail for r in results if r.id == rule)
    assert named in detail, detail


def qmpmig(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qmpmig", "check", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_status(spawn_device, tmp_path):
    good = spawn_device(*FAST, name="good")
    bad = spawn_device(*FAST, "--defect", "accept-illegal-arc", name="bad")

    done = qmpmig("--socket", str(good.socket), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and report["device"]["protocol"] == "v2"
    assert {r["id"] for r in report["results"]} == {r.id for r in check.RULES}

    done = qmpmig("--socket", str(bad.socket))
    assert done.returncode == 1, done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "v2-refused" in failed[0] and "STOP_COPY -> PRE_COPY" in failed[0]
    assert "[uAPI §2.3; seed 004]" in failed[0]

    assert qmpmig("--socket", str(tmp_path / "nobody.sock")).returncode == 2
    assert qmpmig("--socket", str(good.socket), "--protocol", "v1").returncode == 2
    assert good.alive() and bad.alive()
