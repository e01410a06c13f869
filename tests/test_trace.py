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
        dict(kind="ram_verify", bytes=1 << 20, unit=4096, differing=0, first_gpa=None),
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
    ("ram-verify", lambda r: r[index(r, "ram_verify")].update(differing=2, first_gpa=8192)),
])
def test_each_broken_rule_is_caught(rule, mutate):
    assert rule in broken(mutate)


def libvirt_flow():
    """The reference flow as ``qmpmig migrate --libvirt`` traces it: the
    destination's devices arrive later (``paired``), the vCPU stop and the
    resume are libvirt calls, and libvirt continues QEMU at pre-switchover
    (seen as the source QEMU's status)."""
    records = good_flow()
    first = records[0]
    records[0] = dict(kind="start", devices=[d for d in first["devices"] if d["side"] == "src"])
    records.insert(2, dict(kind="paired", devices=[d for d in first["devices"] if d["side"] == "dst"]))
    records[index(records, "qmp_command", command="stop")] = libvirt_call("src", "virDomainSuspend", "stop")
    records[index(records, "qmp_command", command="cont")] = libvirt_call("dst", "virDomainResume", "cont")
    records[index(records, "qmp_command", command="migrate-continue")] = dict(
        kind="vm_state", side="src", runstate="postmigrate", status="completed")
    return records


def libvirt_call(side, call, qmp):
    return dict(kind="libvirt_call", side=side, call=call, qmp=qmp, arguments={})


def test_the_libvirt_flow_passes():
    assert check(trace(*libvirt_flow())) == []


@pytest.mark.parametrize("rule,mutate", [
    ("vcpu-stop", lambda r: move(r, index(r, "libvirt_call", qmp="stop"),
                                 index(r, "device_state", side="src", device="B", to="PRE_COPY_P2P"))),
    ("end-of-stream", lambda r: move(r, index(r, "vm_state", status="completed"),
                                     index(r, "end_of_stream", device="B"))),
    ("resume-before-run", lambda r: move(r, index(r, "libvirt_call", qmp="cont"),
                                         index(r, "device_state", side="dst", device="B", to="RUNNING"))),
    ("cont-after-copy", lambda r: move(r, index(r, "dirty_copy"), len(r))),
])
def test_each_broken_rule_is_caught_under_libvirt(rule, mutate):
    records = libvirt_flow()
    mutate(records)
    assert rule in {v.rule for v in check(trace(*records))}


def test_a_cancel_from_pre_switchover_through_device_is_no_switchover():
    """QEMU 7.2's migrate_cancel at pre-switchover may report ``device`` on
    its way to ``cancelled``: no stream had to end for that."""
    records = good_flow()
    at = index(records, "qmp_command", command="migrate-continue")
    records[at:] = [dict(kind="vm_state", side="src", runstate="finish-migrate", status=status)
                    for status in ("device", "cancelling", "cancelled")]
    records.insert(at, dict(kind="data", side="src", device="A", bytes=9))
    assert check(trace(*records)) == []


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


@pytest.mark.parametrize("record", [
    dict(kind="start"),
    dict(kind="device_state", side="src", device="A", to="STOP"),
    dict(kind="device_state", side="sideways", device="A", **{"from": "RUNNING", "to": "STOP"}),
    dict(kind="device_state", side="src", device="A", **{"from": "RUNNING", "to": "BANANA"}),
    dict(kind="page_request", side="src", device="A"),
])
def test_a_record_that_breaks_the_schema_is_reported_not_a_crash(record):
    records = good_flow()
    records.insert(5, record)
    assert {v.rule for v in check(trace(*records))} == {"schema"}


def test_schema_violation_is_reported():
    assert "schema" in {v.rule for v in check(trace(dict(kind="nonsense")))}


# -- the checker's independence from the controller ---------------------------

CONTROLLER_RULE_MODULES = ("fsm", "states", "trace", "controller", "migration")


def test_checker_imports_no_controller_rule_code():
    """The checker shares no rule code with the controller: a bug there must
    not pass both."""
    import ast
    from pathlib import Path

    import qmpmig.tools.tracecheck as tracecheck

    tree = ast.parse(Path(tracecheck.__file__).read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                # qmpmig/tools/tracecheck.py: "." is qmpmig.tools, ".." is qmpmig
                package = ["qmpmig", "tools"][:max(0, 2 - (node.level - 1))]
                base = ".".join(package + ([node.module] if node.module else []))
            imported += [base] + [f"{base}.{alias.name}" for alias in node.names]
    forbidden = [name for name in imported for mod in CONTROLLER_RULE_MODULES
                 if name == f"qmpmig.{mod}" or name.startswith(f"qmpmig.{mod}.")]
    assert imported and not forbidden


@pytest.mark.parametrize("flags,count", [(1, 6), (3, 8), (5, 9), (7, 15), (0, 0), (2, 0), (4, 0), (6, 0)])
def test_checker_arc_table_has_the_kernel_arc_counts(flags, count):
    """vfio_main.c: the base arcs plus the P2P / no-P2P / PRE_COPY lists; no
    arcs without the mandatory STOP_COPY."""
    from qmpmig.tools.tracecheck import arcs

    assert len(arcs(flags)) == count
    assert len(arcs(flags | 8)) == count


@pytest.mark.parametrize("flags,old,new", [
    (7, "STOP_COPY", "PRE_COPY"),       # refused by the kernel for every device
    (1, "RUNNING", "RUNNING_P2P"),      # a P2P arc on a device without P2P
])
def test_fsm_rule_catches_an_arc_outside_the_kernel_lists(flags, old, new):
    violations = check(trace(start(("A", "src", flags)), ATTEMPT, arc("src", "A", old, new)))
    assert [v.rule for v in violations] == ["fsm"]
    assert f"{old} -> {new} is not an arc for flags {flags:#x}" in violations[0].message
