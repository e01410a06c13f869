"""The reference device: a PCI function with internal state, a DMA engine,
and VFIO migration, v1 or v2, over one core.

The core keeps seed 000's control bits (RUNNING, SAVING, RESUMING, NDMA)
and performs the event-triggered actions of :data:`qmpmig.migration.fsm.V1_ACTIONS`
in their priority order.  The v1 migration region writes those bits
directly; a v2 MIG_DEVICE_STATE set walks :func:`qmpmig.migration.fsm.plan`
and moves the bits one arc at a time (each v2 state has its v1 twin,
:data:`qmpmig.migration.states.V1_TO_V2`), so both protocols share one set of
actions, as the kernel's drivers share ``vfio_mig_get_next_state``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..errors import DeviceError, InvalidTransition, StreamError
from ..migration import fsm
from ..migration.fsm import v1_requestable
from ..migration.states import V1, MigFlags, MigState, v1_to_v2, v2_to_v1
from ..vfio_user.uapi import PAGE_SIZE, field_at
from . import records
from .bar0 import CTRL_DMA_ENABLE, MAGIC, REGISTERS, WRITABLE
from .dma import DmaLog, DmaSpace
from .migration import Loader, NullLoader, NullSaver, Saver
from .state import InternalState

log = logging.getLogger("qmpmig.device")

#: Debug defects: each breaks one rule on purpose so a checker can be shown
#: to catch it.
DEFECTS = {
    "accept-illegal-arc": "v2: accept STOP_COPY -> PRE_COPY (the kernel refuses it)",
    "data-size-changes": "v1: data_size changes on a re-read within one iteration",
    "dma-in-ndma": "DMA goes on in NDMA / P2P states",
    "cut-data-reply": "v2: the first stop-copy MIG_DATA_READ reply of 1 MiB or more is cut in the middle and the "
                      "connection closed",
    "slow-start": "the first start after a resume takes 3 s, the device answering nothing meanwhile "
                  "(opens a window between the load and the run for a fault to land in)",
    "reset-on-sigusr1": "SIGUSR1 resets the device without its client asking (a function-level reset through "
                        "another path, as in libvfio-user issue #853), which no message of the protocol does",
}

#: Seconds the slow-start defect takes.
SLOW_START = 3.0
#: The most records one engine tick writes, whatever ``dma_rate`` the
#: client programmed (a u32): the engine shares the event loop with the
#: client's own commands, which must stay answered (seed 003).
DMA_BURST = 256


@dataclass
class DeviceConfig:
    state_size: int = 16 << 20
    migration: str = "v2"
    mig_flags: int = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY
    ndma: bool = True
    mutate_rate: float = 200.0
    dma_rate: float = 500.0
    fault_stride: int = 0
    device_id: int = 1
    defects: frozenset[str] = field(default_factory=frozenset)
    #: Bench mode: the stop-copy stream is this many bytes from memory and a
    #: resume discards what it gets (0: off; the state does not migrate).
    null_stream: int = 0

    def stream_config(self) -> dict:
        """What a resume stream must agree on (savestream header)."""
        return {"state_size": self.state_size, "page_size": PAGE_SIZE, "device_id": self.device_id}


#: What migrates with the device (the REGS chunk); the rest is fixed or
#: belongs to the connection.
MIGRATED = ("ctrl", "ring_iova", "ring_size", "dma_rate", "dma_seq", "scratch")


class ReferenceDevice:
    """Everything the device is, without the socket."""

    def __init__(self, config: DeviceConfig):
        self.config = config
        self.state = InternalState(config.state_size, seed=config.device_id)
        self.dma_log = DmaLog()
        self.dma = DmaSpace(self.dma_log)
        self.bits = V1.RUNNING
        self.error: str | None = None
        self.saver: Saver | None = None
        self.loader: Loader | None = None
        self.loaded = False
        self.regs = self._fresh_registers()
        self.client_losses = 0
        self.present_pages: set[int] = set()
        self.page_request_outstanding: int | None = None
        self.page_request: Callable[[int], Awaitable[None]] | None = None
        self.dma_writes_in_ndma = 0

    def _fresh_registers(self) -> dict[str, int]:
        regs = dict.fromkeys(REGISTERS, 0)
        regs.update(magic=MAGIC, device_id=self.config.device_id, dma_rate=int(self.config.dma_rate))
        return regs

    # -- state ------------------------------------------------------------

    @property
    def device_state(self) -> MigState:
        return MigState.ERROR if self.error else v1_to_v2(self.bits)

    @property
    def running(self) -> bool:
        return not self.error and bool(self.bits & V1.RUNNING)

    @property
    def dma_allowed(self) -> bool:
        """Seed 000: no DMA with NDMA, !RUNNING or in ERROR."""
        if "dma-in-ndma" in self.config.defects and self.running:
            return True
        return self.running and not self.bits & V1.NDMA

    def reset(self) -> None:
        """DEVICE_RESET: RUNNING from any state, ERROR included; the data
        window is discarded and the function is as freshly opened."""
        if self.saver:
            self.saver.close()
        self.saver = self.loader = None
        #: A resume loaded a state that has not run yet.
        self.loaded = False
        self.bits, self.error = V1.RUNNING, None
        self.state = InternalState(self.config.state_size, seed=self.config.device_id)
        self.regs = self._fresh_registers()
        self.present_pages.clear()
        self.dma_log.stop()

    def disconnect(self) -> None:
        """The client went away: drop its mappings, then reset; the loss is
        counted for the device's life (``client_losses``: a reset is the one
        thing a client's death costs, and tests must be able to see it)."""
        self.dma.clear()
        self.reset()
        self.client_losses += 1

    def set_v1(self, new: int) -> None:
        """A write of the v1 device_state: its actions in seed 000's order."""
        if self.error:
            raise DeviceError(errno.EINVAL, "device is in the error state: reset it")
        if not v1_requestable(new) or (new & V1.NDMA and not self.config.ndma):
            raise DeviceError(errno.EINVAL, f"device_state {new:#x} may not be requested")
        self._apply(V1(new))

    def set_v2(self, new: int) -> None:
        """MIG_DEVICE_STATE SET: every arc of fsm.plan, in order."""
        flags = self.config.mig_flags
        try:
            target = MigState(new)
        except ValueError:
            raise DeviceError(errno.EINVAL, f"device_state {new} is not a state") from None
        try:
            steps = fsm.plan(self.device_state, target, flags)
        except InvalidTransition as err:
            if not ("accept-illegal-arc" in self.config.defects
                    and (self.device_state, target) == (MigState.STOP_COPY, MigState.PRE_COPY)):
                raise DeviceError(errno.EINVAL, str(err)) from None
            steps = [target]
        if any(not v2_to_v1(s) & V1.RUNNING for s in steps):
            self._check_can_stop()
        for step in steps:
            self._apply(v2_to_v1(step))

    def _check_can_stop(self) -> None:
        if self.page_request_outstanding is not None:
            raise DeviceError(errno.EBUSY, f"page request for {self.page_request_outstanding:#x} "
                                           "is outstanding: it must complete before !RUNNING")

    def _apply(self, new: V1) -> None:
        old = self.bits
        actions = fsm.v1_actions(old, new)
        if "!RUNNING" in actions:
            self._check_can_stop()
        for name in actions:
            ACTIONS[name](self)
        if old & V1.SAVING and not new & V1.SAVING and self.saver:
            self.saver.close()
            self.saver = None
        self.bits = new
        if self.error:
            raise DeviceError(errno.EIO, self.error)
        log.info("device_state %r -> %r (%s)", old, new, ", ".join(actions))

    def _start_precopy(self) -> None:
        """SAVING|RUNNING: clear the window, stream pre-copy data."""
        self.saver = Saver(self.state, self.config.stream_config(), precopy=True)

    def _ndma(self) -> None:
        """NDMA: no new DMA; the engine checks dma_allowed before each write."""

    def _stop(self) -> None:
        """!RUNNING: internal state stops changing (no mutation, no DMA)."""

    def _stop_copy(self) -> None:
        """SAVING|!RUNNING: what logging did not cover, plus logged changes."""
        if self.config.null_stream:
            self.saver = NullSaver(self.config.null_stream)
        elif self.saver is None or not self.saver.precopy or self.saver.ended:
            self.saver = Saver(self.state, self.config.stream_config(), precopy=False)
        self.saver.stop_copy(self.migrated_registers)

    def _resume(self) -> None:
        """RESUMING: open a cleared window for the incoming stream."""
        if self.config.null_stream:
            self.loader = NullLoader(self.migrated_registers)
        else:
            self.loader = Loader(self.state, self.config.stream_config())

    def _load(self) -> None:
        """!RESUMING: load and validate what was written; ERROR if invalid.
        Each register must fit its width: a stream is the client's to
        write, and what it loads must not break the device (seed 003)."""
        loader, self.loader = self.loader, None
        try:
            regs = loader.finish()
            for name in MIGRATED:
                REGISTERS[name].pack(regs[name])
            self.state.set_rng_state(regs["rng"])
            self.regs.update({name: regs[name] for name in MIGRATED})
            self.loaded = True
        except (StreamError, LookupError, TypeError, ValueError, ArithmeticError, struct.error) as err:
            self.error = f"resume refused: {err}"
            log.error("%s", self.error)

    def _run(self) -> None:
        """RUNNING: the device may change its state and answers MMIO."""
        if self.loaded and "slow-start" in self.config.defects:
            time.sleep(SLOW_START)
        self.loaded = False

    def _allow_dma(self) -> None:
        """!NDMA: DMA may start again (when RUNNING)."""

    def migrated_registers(self) -> dict:
        regs = {name: self.regs[name] for name in MIGRATED}
        regs["rng"] = self.state.rng_state()
        return regs

    def state_hash(self) -> bytes:
        """Digest of everything that migrates: internal state and registers."""
        regs = json.dumps({n: self.regs[n] for n in MIGRATED}, sort_keys=True).encode()
        return hashlib.blake2b(self.state.digest() + regs, digest_size=32).digest()

    # -- BAR0 ---------------------------------------------------------------

    def mmio_read(self, offset: int, count: int) -> bytes:
        """!RUNNING: reads return all ones (seeds 003, 004)."""
        if not self.running:
            return b"\xff" * count
        name = field_at(REGISTERS, offset, count)
        if name == "client_losses":
            return REGISTERS[name].pack(self.client_losses)
        return REGISTERS[name].pack(self.regs[name]) if name else bytes(count)

    def mmio_write(self, offset: int, data: bytes) -> None:
        """!RUNNING: writes are dropped and change nothing."""
        if not self.running:
            return
        name = field_at(REGISTERS, offset, len(data))
        if name in WRITABLE:
            self.regs[name] = REGISTERS[name].unpack(data)

    # -- the device at work -------------------------------------------------

    async def run_engines(self, tick: float = 0.01) -> None:
        """Mutate internal state and issue DMA while the bits allow it."""
        mutate_credit = dma_credit = 0.0
        while True:
            await asyncio.sleep(tick)
            if self.running:
                mutate_credit += self.config.mutate_rate * tick
                n, mutate_credit = int(mutate_credit), mutate_credit % 1
                self.state.mutate(n)
            if self.dma_allowed and self.regs["ctrl"] & CTRL_DMA_ENABLE:
                dma_credit += self.regs["dma_rate"] * tick
                n, dma_credit = min(int(dma_credit), DMA_BURST), dma_credit % 1
                for _ in range(n):
                    if not await self.dma_one():
                        break
            else:
                dma_credit = 0.0

    async def dma_one(self) -> bool:
        """Write the next record; raise a page request first if its page is
        not present.  False when the ring is unusable or DMA got disallowed.

        A DMA that fails (the ring not mapped for writing, the client's file
        shrunk under it, a page request refused or left unanswered by a
        client that went away) is the client's doing: counted in
        ``dma_faults``, the engine stopped (``ctrl`` bit 0 cleared), the
        device serving on (seed 003)."""
        slots = self.regs["ring_size"] // records.SIZE
        if not slots:
            return False
        seq = self.regs["dma_seq"]
        iova = self.regs["ring_iova"] + (seq % slots) * records.SIZE
        page = iova // PAGE_SIZE
        stride = self.config.fault_stride
        if stride and page % stride == stride - 1 and page not in self.present_pages:
            if self.page_request is None:
                return False
            self.page_request_outstanding = iova
            self.regs["page_requests"] += 1
            try:
                await self.page_request(iova)
            except OSError as err:
                return self._dma_fault(iova, f"page request: {err}")
            finally:
                self.page_request_outstanding = None
            self.present_pages.add(page)
        if not self.dma_allowed:
            return False
        if self.bits & V1.NDMA or not self.bits & V1.RUNNING:
            self.dma_writes_in_ndma += 1
        try:
            self.dma.write(iova, records.record(self.config.device_id, seq))
        except OSError as err:
            return self._dma_fault(iova, str(err))
        self.regs["dma_seq"] = seq + 1
        return True

    def _dma_fault(self, iova: int, why: str) -> bool:
        log.warning("DMA to %#x failed: %s; engine disabled", iova, why)
        self.regs["dma_faults"] += 1
        self.regs["ctrl"] &= ~CTRL_DMA_ENABLE
        return False


#: Seed 000's event-triggered actions (fsm.V1_ACTIONS) -> what this device does.
ACTIONS: dict[str, Callable[[ReferenceDevice], None]] = {
    "SAVING|RUNNING": ReferenceDevice._start_precopy,
    "NDMA": ReferenceDevice._ndma,
    "!RUNNING": ReferenceDevice._stop,
    "SAVING|!RUNNING": ReferenceDevice._stop_copy,
    "RESUMING": ReferenceDevice._resume,
    "!RESUMING": ReferenceDevice._load,
    "RUNNING": ReferenceDevice._run,
    "!NDMA": ReferenceDevice._allow_dma,
}
