"""Fuzzing, short: a run of each target of scripts/fuzz (the long run,
100,000 cases a target, is by hand: docs/reliability.md), hypothesis's
sequences of messages to the real server in every device state, and a
short atheris run where atheris is installed.  Every hostile input
answered or refused, no exception out of the server, the client or the
codecs but qmpmig's own, no hang, no fd left open, no damaged device
stream accepted."""

import asyncio
import importlib.util
import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qmpmig.device.service import MIGRATION_REGION
from qmpmig.device.v1region import DATA_OFFSET, REGION_SIZE
from qmpmig.errors import DeviceError, ProtocolError
from qmpmig.migration.states import MigState
from qmpmig.tools import fuzz
from qmpmig.vfio_user import codec
from qmpmig.vfio_user.codec import Command as C, Message
from qmpmig.vfio_user.uapi import DmaFlags, Feature, FeatureFlags as FF, IrqSetFlags

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def run_fuzz(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "scripts/fuzz"), *args],
                          capture_output=True, text=True, timeout=300, env=ENV)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], json.dumps(result, indent=1) + done.stderr[-2000:]
    return result


@pytest.mark.parametrize("target, cases", [("server", 300), ("client", 200), ("stream", 200), ("v1region", 100)])
def test_a_short_fuzzing_run_finds_nothing(target, cases):
    stats = run_fuzz("--target", target, "--cases", str(cases), "--seed", "1000")[target]
    assert stats["cases"] == cases and stats["failure_count"] == 0
    if target == "server":
        assert stats["error_replies"] > 0 and stats["replies"] > 0 and stats["cut_mid_frame"] > 0, stats
    elif target == "stream":
        assert stats["damaged"] > 0 and stats["refused"] == stats["damaged"], stats
    elif target == "client":
        assert stats["bad"] > 0 and stats["opened"] > 0 and stats["failed_cleanly"] > 0, stats
        assert all(stats.get(bend) for bend in fuzz.HostileDevice.BENDS), stats
    else:
        assert stats["loaded"] == stats["saves"] > 0 and stats["refused"] > 0 and stats["answered"] > 0, stats


#: (target, seed, what the case found before its fix), replayed in process.
REGRESSIONS = [
    ("server", 1, "the fd of half a frame stayed open when the client hung up (transport: _shutdown)"),
    ("client", 16, "the same in the client"),
    ("client", 4, "a reply of another command's cmd reached the caller: AttributeError (transport: _settle)"),
    ("client", 65, "a window fd smaller than the window: ValueError out of RemoteDevice.open (devices: _map_window)"),
    ("client", 98, "error reply errno 0xFFFFFFFF: OverflowError in a done callback, request hung (errors: ErrorReply)"),
    ("client", 20336531, "a v1 device_state of no state (0x41): ValueError out of V1Device.state (devices: _v2_state)"),
    ("stream", 84, "forged registers: int(Infinity) escaped the load (model: ReferenceDevice._load)"),
    ("stream", 481, "forged registers: IndexError escaped the load"),
    ("stream", 734, "forged registers: IndexError on a string"),
]


@pytest.mark.parametrize("target, seed, found", REGRESSIONS)
def test_a_case_that_found_a_bug_passes(target, seed, found):
    result = fuzz.run_target(target, range(seed, seed + 1))
    assert result["failure_count"] == 0, (found, result["failures"])


def test_a_failure_names_its_seed_and_replays(monkeypatch):
    """A case that fails is reported with its seed, and --seed S --cases 1 runs that case alone."""
    monkeypatch.setitem(fuzz.TARGETS, "stream", lambda seed, stats: "broken" if seed == 7 else None)
    result = fuzz.run_target("stream", range(5, 10))
    assert result["failures"] == [{"seed": 7, "failure": "broken"}] and result["cases"] == 5


# -- hypothesis: sequences of messages to the real server, in every device state

u64 = st.one_of(st.sampled_from([0, 4, 8, 16, 24, DATA_OFFSET, REGION_SIZE, 1 << 63, (1 << 64) - 1]),
                st.integers(0, (1 << 64) - 1))
counts = st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(1, 8192))
regions = st.integers(0, MIGRATION_REGION + 1)


@st.composite
def region_access(draw, cmd):
    offset, region, count = draw(u64), draw(regions), draw(counts)
    data = draw(st.binary(min_size=count, max_size=count)) if cmd == C.REGION_WRITE else b""
    return codec.RegionAccess(offset, region, count, data)


@st.composite
def feature(draw, v1: bool):
    ops = draw(st.sampled_from([FF.GET, FF.SET, FF.PROBE | FF.GET, FF.PROBE | FF.SET, FF.GET | FF.SET, 0]))
    which = draw(st.sampled_from(list(Feature)))
    if which == Feature.MIG_DEVICE_STATE and ops == FF.SET:
        data = codec.MigDeviceStateData(draw(st.sampled_from(list(MigState)))).pack()
    else:
        data = draw(st.binary(max_size=48))
    return codec.DeviceFeature.sized(ops | which, data, room=draw(st.sampled_from([0, 8, 64])))


def payloads(v1: bool):
    """Every client command with payloads of any size and place."""
    return st.one_of(
        st.tuples(st.just(C.DEVICE_GET_INFO), st.just(codec.DeviceInfo.sized(0, 0, 0))),
        st.tuples(st.just(C.DEVICE_GET_REGION_INFO),
                  st.builds(codec.RegionInfo, st.sampled_from([32, 48, 512]), st.just(0), regions,
                            st.just(0), st.just(0), st.just(0))),
        st.tuples(st.just(C.DEVICE_GET_IRQ_INFO), st.builds(codec.IrqInfo.sized, st.just(0), st.integers(0, 6),
                                                           st.just(0))),
        st.tuples(st.just(C.DEVICE_SET_IRQS), st.builds(codec.SetIrqs.sized, st.sampled_from(
            [IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK]),
            st.integers(0, 5), st.integers(0, 2), st.integers(0, 2))),
        st.tuples(st.just(C.REGION_READ), region_access(C.REGION_READ)),
        st.tuples(st.just(C.REGION_WRITE), region_access(C.REGION_WRITE)),
        st.tuples(st.just(C.REGION_WRITE), st.builds(   # a v1 device_state of any value
            lambda value: codec.RegionAccess(0, MIGRATION_REGION, 4, struct.pack("<I", value)),
            st.sampled_from(fuzz.V1_REQUESTABLE + fuzz.V1_REFUSED))),
        st.tuples(st.just(C.DMA_MAP), st.builds(codec.DmaMap, st.just(DmaFlags.READ | DmaFlags.WRITE),
                                                st.sampled_from([0, 4096]), u64, st.sampled_from([1, 4096, 1 << 20]))),
        st.tuples(st.just(C.DMA_UNMAP), st.builds(codec.DmaUnmap.sized, st.just(0), u64, st.sampled_from([4096]))),
        st.tuples(st.just(C.DEVICE_RESET), st.just(codec.Empty())),
        st.tuples(st.just(C.DEVICE_FEATURE), feature(v1)),
        st.tuples(st.just(C.MIG_DATA_READ), st.builds(lambda n: codec.MigDataRead.sized(n, room=n), counts)),
        st.tuples(st.just(C.MIG_DATA_WRITE), st.builds(lambda d: codec.MigDataWrite.sized(len(d), d),
                                                       st.binary(min_size=1, max_size=256))),
    )


#: How a frame is bent: None (sent as is), or (what, where, value).
bends = st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(["flip", "cut", "cmd", "flags", "argsz"]),
                                                  st.integers(0, 1 << 16), st.integers(0, (1 << 32) - 1)))


def bent(frame: bytes, how) -> bytes:
    if how is None:
        return frame
    what, where, value = how
    data = bytearray(frame)
    if what == "flip" and len(data) > 16:
        data[16 + where % (len(data) - 16)] ^= 1 << value % 8
    elif what == "cut" and len(data) > 16:
        data = data[:16 + where % (len(data) - 16)]
        struct.pack_into("<I", data, 4, len(data))
    elif what == "cmd":
        struct.pack_into("<H", data, 2, value & 0xFFFF)
    elif what == "flags":
        struct.pack_into("<I", data, 8, value)
    elif what == "argsz" and len(data) >= 20:
        struct.pack_into("<I", data, 16, value)
    return bytes(data)


V1_STARTS = {"RUNNING": [1], "STOP": [0], "SAVING": [2], "PRE_COPY": [3], "RESUMING": [4], "NDMA": [9],
             "SAVING|NDMA": [11], "SAVING|NDMA|RUNNING": [3, 11], "ERROR": [4, 1]}
V2_STARTS = {**{s.name: [s] for s in MigState if s is not MigState.ERROR},
             "ERROR": [MigState.RESUMING, MigState.STOP]}


@st.composite
def sessions(draw):
    """A device of either protocol in any of its states, and a sequence of
    client messages, some bent."""
    v1 = draw(st.booleans())
    start = draw(st.sampled_from(sorted(V1_STARTS if v1 else V2_STARTS)))
    messages = draw(st.lists(st.tuples(payloads(v1), bends), min_size=1, max_size=10))
    return v1, start, messages


async def _session(v1: bool, start: str, messages, stats: Counter) -> str | None:
    device = fuzz.reference_device(v1)
    for step in (V1_STARTS if v1 else V2_STARTS)[start]:
        try:
            device.set_v1(step) if v1 else device.set_v2(step)
        except DeviceError:
            pass            # the way to ERROR
    memfd = os.memfd_create("fuzz-guest")
    os.ftruncate(memfd, 1 << 20)
    try:
        async with fuzz.serving(device) as (ours, _):
            conn = codec.Connection(codec.Party.CLIENT, max_msg_fds=8)
            frames = [(fuzz.version_frame(conn), ())]
            for msg_id, ((cmd, payload), how) in enumerate(messages, 1):
                try:
                    frame = conn.send(Message(msg_id, cmd, payload))
                except ProtocolError:
                    continue
                frames.append((bent(frame, how), (memfd,) if cmd == C.DMA_MAP else ()))
            return await fuzz.send_frames(ours, frames, stats)
    finally:
        os.close(memfd)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sessions())
def test_every_message_in_every_device_state_is_answered(session):
    """Property: whatever the device's state and whatever the client sends,
    each framed command gets its reply or error reply within a second, no
    handler raises anything but qmpmig's errors, and the connection's end
    leaves no fd open."""
    v1, start, messages = session
    stats = Counter()
    fds = fuzz.open_fds()
    with fuzz.HandlerExceptions().installed() as raised:
        failure = asyncio.run(_session(v1, start, messages, stats))
        failure = failure or raised.verdict(stats)
    assert failure is None, failure
    assert fuzz.open_fds() == fds
    assert stats["frames"] >= 1


# -- atheris ---------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed (optional)")
def test_a_short_atheris_run_finds_nothing():
    result = run_fuzz("--engine", "atheris", "--cases", "300", "--seed", "1")
    for name in ("server", "client", "stream", "v1region"):
        figures = result[f"atheris-{name}"]
        assert figures["runs"] == 300 and figures["cov"] > 0 and not figures["crashes"], figures
