"""The trace checker on synthetic traces: a correct flow passes, and each
way of breaking a rule is caught by that rule (and the checker never
crashes on a bad trace)."""

import pytest

from qmpmig.tools.tracecheck import check


def trace(*records):
    return [dict(seq=i, t=float(i), **r) for i, r in enumerate(records)]


def arc(side, dev, a, b, **kw):
    return dict(kind="device_state", side=side, device=dev, **{"from": a, "to": b}, **kw)


def start(*devices):
    return dict(kind="start", devices=[dict(name=n, side=s, protocol="v2", flags=f) for n, s, f in devices])


ATTEMPT = dict(kind="phase", name="attempt", attempt=1)


def cmd(side, command):
    return dict(kind="qmp_command", side=side, command=command, arguments={})


def good_flow():
    return [
        start(("A", "src", 7), ("B", "src", 7), ("A", "dst", 7), ("B", "dst", 7)), ATTEMPT,
        *(r for d in "AB" for r in (arc("dst", d, "ERROR", "RUNNING", via="reset"),
                                    arc("dst", d, "RUNNING", "RUNNING_P2P"), arc("dst", d, "RUNNING_P2P", "STOP"),
                                    arc("dst", d, "STOP", "RESUMING"))),
        arc("src", "A", "RUNNING", "PRE_COPY"), arc("src", "B", "RUNNING", "PRE_COPY"),
        dict(kind="page_request", side="src", device="A", iova=4096),
        arc("src", "A", "PRE_COPY", "PRE_COPY_P2P"), arc("src", "B", "PRE_COPY", "PRE_COPY_P2P"),
        dict(kind="page_complete", side="src", device="A", iova=4096),
        cmd("src", "stop"),
        arc("src", "A", "PRE_COPY_P2P", "STOP_COPY"), arc("src", "B", "PRE_COPY_P2P", "STOP_COPY"),
        dict(kind="end_of_stream", side="src", device="A", bytes=1),
        dict(kind="end_of_stream", side="src", device="B", bytes=1),
        cmd("src", "migrate-continue"),
        dict(kind="dirty_copy", pages=3),
        arc("dst", "A", "RESUMING", "STOP"), arc("dst", "B", "RESUMING", "STOP"),
        arc("dst", "A", "STOP", "RUNNING_P2P"), arc("dst", "B", "STOP", "RUNNING_P2P"),
        arc("dst", "A", "RUNNING_P2P", "RUNNING"), arc("dst", "B", "RUNNING_P2P", "RUNNING"),
        cmd("dst", "cont"),
    ]


def broken(mutate):
    records = good_flow()
    mutate(records)
    return {v.rule for v in check(trace(*records))}


def index(records, kind, **match):
    return next(i for i, r in enumerate(records) if r["kind"] == kind and all(r.get(k) == v for k, v in match.items()))


def test_the_reference_flow_passes():
    assert check(trace(*good_flow())) == []


def move(records, what, before):
    records.insert(before, records.pop(what))


@pytest.mark.parametrize("rule,mutate", [
    ("fsm", lambda r: r.insert(6, arc("src", "A", "RUNNING", "STOP_COPY"))),
    ("fsm", lambda r: r.insert(index(r, "qmp_command", command="stop"),
                               arc("src", "A", "PRE_COPY_P2P", "PRE_COPY_P2P"))),
    ("vcpu-stop", lambda r: move(r, index(r, "qmp_command", command="stop"),
                                 index(r, "device_state", side="src", device="B", to="PRE_COPY_P2P"))),
    ("vcpu-stop", lambda r: move(r, index(r, "page_complete"), index(r, "qmp_command", command="stop") + 1)),
    ("barrier", lambda r: move(r, index(r, "device_state", side="dst", device="A", to="RUNNING",
                                        **{"from": "RUNNING_P2P"}),
                               index(r, "device_state", side="dst", device="B", to="RUNNING_P2P",
                                     **{"from": "STOP"}))),
    ("end-of-stream", lambda r: move(r, index(r, "qmp_command", command="migrate-continue"),
                                     index(r, "end_of_stream", device="B"))),
    ("end-of-stream", lambda r: r.insert(index(r, "qmp_command", command="migrate-continue"),
                                         dict(kind="data", side="src", device="A", bytes=9))),
    ("resume-before-run", lambda r: move(r, index(r, "device_state", side="dst", device="A", to="STOP",
                                               **{"from": "RESUMING"}),
                                         index(r, "device_state", side="dst", device="B", to="RUNNING_P2P",
                                               **{"from": "STOP"}) + 1)),
    ("cont-after-copy", lambda r: move(r, index(r, "dirty_copy"), len(r))),
])
def test_each_broken_rule_is_caught(rule, mutate):
    assert rule in broken(mutate)


def test_a_qemu_stop_after_the_grace_state_is_the_reference_stop():
    records = good_flow()
    records[index(records, "qmp_command", command="stop")] = dict(kind="qmp_event", side="src", event="STOP", data={})
    assert check(trace(*records)) == []


def test_a_qemu_stop_before_the_grace_state_forbids_stop_copy():
    records = good_flow()
    records.pop(index(records, "qmp_command", command="stop"))
    records.insert(index(records, "device_state", side="src", device="A", to="PRE_COPY_P2P"),
                   dict(kind="qmp_event", side="src", event="STOP", data={}))
    assert "vcpu-stop" in {v.rule for v in check(trace(*records))}


def test_non_p2p_device_with_outstanding_page_request_at_stop():
    rules = {v.rule for v in check(trace(start(("A", "src", 5)), ATTEMPT, arc("src", "A", "RUNNING", "PRE_COPY"),
                                         dict(kind="page_request", side="src", device="A", iova=4096),
                                         cmd("src", "stop")))}
    assert rules == {"vcpu-stop"}


def test_checker_survives_a_device_error_in_a_barrier():
    violations = check(trace(start(("A", "dst", 7), ("B", "dst", 7)), ATTEMPT,
                             arc("dst", "A", "STOP", "RUNNING_P2P"),
                             dict(kind="device_error", side="dst", device="B", target="RUNNING_P2P", message="EIO"),
                             arc("dst", "A", "RUNNING_P2P", "RUNNING")))
    assert {"barrier", "resume-before-run"} <= {v.rule for v in violations}


def test_cont_with_a_device_still_resuming():
    rules = broken(lambda r: r.insert(index(r, "device_state", side="dst", device="A", to="STOP", **{"from": "RESUMING"}),
                                      cmd("dst", "cont")))
    assert "resume-before-run" in rules


def test_schema_violation_is_reported():
    assert "schema" in {v.rule for v in check(trace(dict(kind="nonsense")))}
