"""qmpmig.migration.fsm against the kernel: vfio_main.c's table, its arc lists and
its list of multi-step paths, for every (cur, new) and every flag set."""

import re

import pytest
from hypothesis import given, strategies as st

from qmpmig.migration import fsm
from qmpmig.errors import InvalidTransition
from qmpmig.migration.fsm import arcs, plan
from qmpmig.migration.states import DEFINED_FLAG_SETS, MigFlags, MigState

S = MigState
F = MigFlags
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY

# The FSM arcs vfio_main.c's comment says a driver must implement, per feature.
BASE = {(S.RESUMING, S.STOP), (S.STOP, S.RESUMING), (S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP)}
P2P = {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING), (S.RUNNING_P2P, S.STOP),
       (S.STOP, S.RUNNING_P2P)}
PRE_COPY = {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.STOP_COPY)}
PRE_COPY_AND_P2P = {(S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.PRE_COPY_P2P),
                    (S.PRE_COPY_P2P, S.PRE_COPY), (S.PRE_COPY_P2P, S.RUNNING_P2P),
                    (S.PRE_COPY_P2P, S.STOP_COPY), (S.RUNNING, S.PRE_COPY),
                    (S.RUNNING_P2P, S.PRE_COPY_P2P)}
NO_P2P = {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
KERNEL_ARCS = {
    F.STOP_COPY: BASE | NO_P2P,
    F.STOP_COPY | F.P2P: BASE | P2P,
    F.STOP_COPY | F.PRE_COPY: BASE | NO_P2P | PRE_COPY,
    ALL: BASE | P2P | PRE_COPY_AND_P2P,
}


def kernel_paths():
    """The 'A -> B -> C' lines of fsm's docstring, copied from vfio_main.c."""
    return [[S[name] for name in line.split(" -> ")]
            for line in re.findall(r"^ {4}([A-Z0-9_]+(?: -> [A-Z0-9_]+)+)$", fsm.__doc__, re.M)]


def test_arc_lists_match_the_kernel_comment():
    assert {f: len(a) for f, a in KERNEL_ARCS.items()} == {1: 6, 3: 8, 5: 9, 7: 15}
    for flags, expected in KERNEL_ARCS.items():
        assert arcs(flags) == expected, F(flags)


def test_multi_step_paths_match_the_kernel_comment():
    paths = kernel_paths()
    assert len(paths) == 25
    for path in paths:
        assert plan(path[0], path[-1], ALL) == path[1:]
    # Every other pair with all features is a single arc, a no-op or refused.
    listed = {(p[0], p[-1]) for p in paths}
    for cur in S:
        for new in S:
            if (cur, new) in listed or S.ERROR in (cur, new):
                continue
            if cur is new:
                assert plan(cur, new, ALL) == []
            elif (cur, new) in {(S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P)}:
                with pytest.raises(InvalidTransition):
                    plan(cur, new, ALL)
            else:
                assert plan(cur, new, ALL) == [new], (cur, new)


def _saving_ok(path):
    """uAPI: a saving-group state appears only at a chain's ends, unless both
    ends are in the group."""
    inner = path[1:-1]
    both_ends = path[0] in fsm.SAVING_GROUP and path[-1] in fsm.SAVING_GROUP
    return both_ends or not any(s in fsm.SAVING_GROUP for s in inner)


def shortest(cur, new, flags):
    """Breadth-first over the kernel's arcs for these flags, honouring the
    saving-group rule: an independent model of what plan() must return."""
    if cur is S.STOP_COPY and new in (S.PRE_COPY, S.PRE_COPY_P2P):
        return None  # blocked outright by the kernel
    graph = KERNEL_ARCS[flags]
    frontier, seen = [[cur]], {cur}
    while frontier:
        nxt = []
        for path in frontier:
            for a, b in graph:
                if a == path[-1] and b not in seen:
                    candidate = path + [b]
                    if b == new:
                        if _saving_ok(candidate):
                            return candidate[1:]
                        continue
                    if b in fsm.SAVING_GROUP and not (cur in fsm.SAVING_GROUP and new in fsm.SAVING_GROUP):
                        continue
                    seen.add(b)
                    nxt.append(candidate)
        frontier = nxt
    return None


@pytest.mark.parametrize("flags", DEFINED_FLAG_SETS, ids=lambda f: f"flags{int(f)}")
def test_every_pair_is_the_shortest_legal_chain(flags):
    for cur in S:
        for new in S:
            supported = fsm.supports(flags, cur) and fsm.supports(flags, new)
            expected = [] if cur is new and supported else shortest(cur, new, flags) if supported else None
            if expected is None:
                with pytest.raises(InvalidTransition):
                    plan(cur, new, flags)
            else:
                assert plan(cur, new, flags) == expected, (cur, new)


@pytest.mark.parametrize("flags", range(8))
def test_error_is_never_a_target_or_a_start(flags):
    for state in S:
        with pytest.raises(InvalidTransition):
            plan(S.ERROR, state, flags)
        with pytest.raises(InvalidTransition):
            plan(state, S.ERROR, flags)


@pytest.mark.parametrize("flags", [0, F.P2P, F.PRE_COPY, F.P2P | F.PRE_COPY])
def test_without_stop_copy_nothing_is_supported(flags):
    for cur in S:
        for new in S:
            with pytest.raises(InvalidTransition):
                plan(cur, new, flags)


@pytest.mark.parametrize("flags", DEFINED_FLAG_SETS, ids=lambda f: f"flags{int(f)}")
def test_stop_copy_never_returns_to_pre_copy(flags):
    for new in (S.PRE_COPY, S.PRE_COPY_P2P):
        with pytest.raises(InvalidTransition):
            plan(S.STOP_COPY, new, flags)


def test_invalid_transition_is_einval_value_error():
    err = pytest.raises(InvalidTransition, plan, S.STOP_COPY, S.PRE_COPY, ALL).value
    assert isinstance(err, ValueError) and err.errno == 22


states = st.sampled_from(list(S))
flag_values = st.one_of(st.sampled_from(DEFINED_FLAG_SETS), st.integers(0, 2**64 - 1))


@given(states, states, flag_values)
def test_plan_steps_are_direct_arcs_of_supported_states(cur, new, flags):
    try:
        path = plan(cur, new, flags)
    except InvalidTransition:
        return
    assert len(path) <= 5
    assert path[-1:] == ([new] if cur != new else [])
    known = flags & ALL
    for a, b in zip([cur, *path], path):
        assert fsm.supports(flags, b)
        assert b is not S.ERROR
        assert (a, b) in KERNEL_ARCS[known]


@given(states, states, flag_values)
def test_plan_refuses_exactly_where_the_kernel_model_has_no_path(cur, new, flags):
    """For any flags, even undefined bits: the shortest legal chain of the
    independent BFS model, or InvalidTransition where it has none."""
    known = flags & ALL
    supported = known in KERNEL_ARCS and fsm.supports(known, cur) and fsm.supports(known, new)
    expected = ([] if cur is new else shortest(cur, new, known)) if supported else None
    if expected is None:
        with pytest.raises(InvalidTransition):
            plan(cur, new, flags)
    else:
        assert plan(cur, new, flags) == expected


def kernel_literal_next(cur, new, flags, bound=100):
    """vfio_mig_get_next_state transcribed without qmpmig's stop at ERROR;
    None where its skip loop would spin forever."""
    step = fsm.NEXT_STEP[cur][new]
    for _ in range(bound):
        if fsm.supports(flags, step):
            return step
        step = fsm.NEXT_STEP[step][new]
    return None


def test_the_kernel_loop_read_literally_spins_where_plan_refuses():
    spinning = {(cur, new) for cur in S for new in S
                if fsm.supports(ALL, cur) and fsm.supports(ALL, new)
                and kernel_literal_next(cur, new, ALL) is None}
    assert spinning == {(S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P)}
    for cur, new in spinning:
        with pytest.raises(InvalidTransition):
            plan(cur, new, ALL)
