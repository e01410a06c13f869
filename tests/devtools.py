"""Helpers for tests that drive a reference device through a client."""

import asyncio
import os
import time

from qmpmig.device.bar0 import read_register as reg_read, start_ring, write_register as reg_write

__all__ = ["RING_IOVA", "guest_memory", "reg_read", "reg_write", "start_dma", "until"]

RING_IOVA = 0x10_0000


def guest_memory(size: int) -> int:
    """A memfd standing in for guest RAM."""
    fd = os.memfd_create("qmpmig-test-guest")
    os.ftruncate(fd, size)
    return fd


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll the async ``condition()`` until it holds; fail naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.02)


async def start_dma(client, mem_fd: int, mem_size: int, ring_size: int = 64 << 10,
                    iova: int = RING_IOVA, rate: int | None = None) -> None:
    """Map the memory at ``iova`` and let the device's DMA engine write
    records into a ring at its start."""
    await client.dma_map(iova, mem_size, os.dup(mem_fd))
    await start_ring(client, iova, ring_size, rate)
