"""Coverage-guided fuzzing with atheris (libFuzzer for Python), qmpmig's
modules instrumented: ``scripts/fuzz --engine atheris [--target T]``.

Targets, each an input of bytes run in one process:

- ``server``: the bytes as a client's stream into the server's codec
  (``Connection(SERVER)``), in pieces of the first byte's size; every
  command that decodes goes to the reference device's DeviceService
  handler (v1 or v2 device, by the second byte) and its reply is encoded;
  every malformed command gets its error reply encoded.
- ``client``: the bytes as a server's stream into the client's codec;
  the replies' feature data read as the Client reads it.
- ``stream``: the bytes written to a RESUMING reference device, which then
  leaves RESUMING (the seed corpus: a real stop-copy stream).
- ``v1region``: the bytes as a program of accesses (read or write, offset,
  size, data) to a v1 device's migration region object.

A rule broken is an exception out of the input: anything but qmpmig's
errors (``QmpmigError``; OSError from a device handler, as the server
answers it), or a stream other than the source's accepted.  libFuzzer
stops at the first one, writes it to ``crash-*`` in the artifact
directory and exits non-zero; ``-timeout`` makes an input that runs too
long a failure too (a hang).  atheris is optional: the tests run it only
where it is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("server", "client", "stream", "v1region")
#: Seconds an input may take before libFuzzer calls it a hang.
INPUT_TIMEOUT = 10


def _targets():
    """name -> (test one input, seed inputs, libFuzzer's max_len); imported
    here, under atheris's instrumentation."""
    import random

    from qmpmig.device.model import DeviceConfig, ReferenceDevice
    from qmpmig.device.service import DeviceService
    from qmpmig.device.v1region import DATA_OFFSET, REGION_SIZE, V1Region
    from qmpmig.errors import DeviceError, ProtocolError, QmpmigError
    from qmpmig.tools import fuzz
    from qmpmig.vfio_user import codec
    from qmpmig.vfio_user.uapi import MIGRATION_INFO

    def device(v1: bool = False) -> ReferenceDevice:
        return ReferenceDevice(DeviceConfig(state_size=fuzz.SMALL_STATE, migration="v1" if v1 else "v2",
                                            dma_rate=0, mutate_rate=0))

    def pieces(conn: codec.Connection, data: bytes, step: int):
        """The events of ``data`` fed to ``conn`` ``step`` bytes at a time,
        until the framing is lost."""
        for pos in range(0, len(data), step):
            conn.receive_data(data[pos:pos + step])
            while (event := conn.next_event()) is not codec.NEED_DATA:
                yield event
                if isinstance(event, codec.BadMessage) and event.fatal:
                    return

    def server(data: bytes) -> None:
        if len(data) < 2:
            return
        service = DeviceService(device(v1=bool(data[1] & 1)))
        conn = codec.Connection(codec.Party.SERVER, max_data_xfer_size=codec.QMPMIG_MAX_DATA_XFER, max_msg_fds=8)
        try:
            for event in pieces(conn, data[2:], data[0] + 1):
                if event.reply:
                    continue
                if isinstance(event, codec.BadMessage):
                    conn.send(codec.error_reply(event, event.errno))
                    continue
                serve = service.commands.get(event.cmd)
                try:
                    result = serve(event) if serve else codec.Empty()
                    conn.send(codec.reply_to(event, result[0] if isinstance(result, tuple) else result))
                except (OSError, QmpmigError):
                    pass
        finally:
            service.detach()
            if service.v1:
                service.v1.close()

    feature_data = (codec.MigrationData, codec.MigDeviceStateData, codec.MigDataSizeData, codec.PrecopyInfoData,
                    codec.StateHashData, codec.DmaLoggingControl, codec.DmaLoggingReport)

    def client(data: bytes) -> None:
        if not data:
            return
        conn = codec.Connection(codec.Party.CLIENT, max_data_xfer_size=codec.QMPMIG_MAX_DATA_XFER, max_msg_fds=8)
        for event in pieces(conn, data[1:], data[0] + 1):
            if isinstance(event, codec.BadMessage) or event.payload is None:
                continue
            if not event.reply:
                conn.send(codec.reply_to(event, event.payload) if event.cmd == codec.Command.QMPMIG_PAGE_REQUEST
                          else codec.error_reply(event, 22))
            elif event.cmd == codec.Command.DEVICE_FEATURE:
                for kind in feature_data:
                    try:
                        kind.unpack(event.payload.data)
                    except ProtocolError:
                        pass

    source = device()
    good = fuzz.saved_stream(source)

    def stream(data: bytes) -> None:
        if fuzz.loads(device(), data) and data != good:
            raise AssertionError("a stream other than the source's was accepted")

    def v1region(data: bytes) -> None:
        import atheris
        provider = atheris.FuzzedDataProvider(data)
        region = V1Region(device(v1=True))
        fields = list(MIGRATION_INFO.values())
        try:
            while provider.remaining_bytes():
                where = provider.ConsumeIntInRange(0, 3)
                if where == 0:                       # a field, at its place and width or near
                    field = fields[provider.ConsumeIntInRange(0, len(fields) - 1)]
                    offset = field.offset + provider.ConsumeIntInRange(0, 3)
                    count = provider.ConsumeIntInRange(1, 8)
                elif where == 1:                     # the data window
                    offset = DATA_OFFSET + provider.ConsumeIntInRange(0, REGION_SIZE)
                    count = provider.ConsumeIntInRange(1, 8192)
                else:
                    offset = provider.ConsumeIntInRange(0, (1 << 64) - 1)
                    count = provider.ConsumeIntInRange(1, 64)
                try:
                    if provider.ConsumeBool():
                        region.write(offset, provider.ConsumeBytes(count).ljust(count, b"\0"))
                    else:
                        region.read(offset, count)
                except DeviceError:
                    pass
        finally:
            region.close()

    server_seeds = []
    for seed in range(64):
        rng = random.Random(seed)
        conn = codec.Connection(codec.Party.CLIENT, max_msg_fds=8)
        frames = [fuzz.version_frame(conn)] + [conn.send(msg) for msg_id in range(1, 6)
                                              for msg, _ in fuzz.client_messages(rng, seed % 2 == 1, msg_id, -1)]
        server_seeds.append(bytes([rng.randrange(256), seed % 2]) + b"".join(frames))
    sender = codec.Connection(codec.Party.SERVER)
    client_seeds = [bytes([255]) + sender.send(msg) for msg in fuzz.SERVER_SAMPLES]
    return {
        "server": (server, server_seeds, 1 << 16),
        "client": (client, client_seeds, 1 << 16),
        "stream": (stream, [good], 2 * len(good)),
        "v1region": (v1region, [bytes(64)], 1 << 12),
    }


def fuzz_one(target: str, libfuzzer_args: list[str]) -> None:
    """This process fuzzes ``target`` (libFuzzer's flags after it), seed
    corpus written to the first directory given; exits as libFuzzer does."""
    import atheris
    with atheris.instrument_imports(include=["qmpmig"]):
        one_input, seeds, max_len = _targets()[target]
    corpus = [arg for arg in libfuzzer_args if not arg.startswith("-")]
    for i, seed in enumerate(seeds):
        Path(corpus[0], f"seed-{i}").write_bytes(seed)
    atheris.Setup([sys.argv[0], f"-max_len={max_len}", *libfuzzer_args], one_input)
    atheris.Fuzz()


#: libFuzzer's last status line: ``#N DONE cov: C ft: F corp: K/S ...``.
DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def run_targets(names: list[str] | None, runs: int, seed: int) -> dict:
    """Each target in a child process for ``runs`` inputs: its figures
    (inputs run, coverage edges, features, corpus, seconds, crashes)."""
    result: dict = {"ok": True}
    try:
        import atheris  # noqa: F401
    except ImportError:
        return {"ok": True, "skipped": "atheris is not installed"}
    for name in names or TARGETS:
        with tempfile.TemporaryDirectory(prefix=f"qmpmig-atheris-{name}-") as work:
            corpus, artifacts = Path(work, "corpus"), Path(work, "artifacts")
            corpus.mkdir()
            artifacts.mkdir()
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "qmpmig.tools.fuzz_atheris", name, f"-runs={runs}",
                                   f"-seed={seed}", f"-timeout={INPUT_TIMEOUT}", "-print_final_stats=1",
                                   f"-artifact_prefix={artifacts}/", str(corpus)],
                                  capture_output=True, text=True)
            match = DONE.search(done.stderr)
            crashes = sorted(p.name for p in artifacts.iterdir())
            figures = {"runs": int(match[1]) if match else None, "cov": int(match[2]) if match else None,
                       "ft": int(match[3]) if match else None, "corpus": int(match[4]) if match else None,
                       "seconds": round(time.monotonic() - t0, 1), "exit": done.returncode, "crashes": crashes}
            if done.returncode or crashes:
                figures["tail"] = done.stderr[-3000:]
                figures["crash_inputs"] = {p.name: p.read_bytes().hex() for p in artifacts.iterdir()}
            result[f"atheris-{name}"] = figures
            result["ok"] = result["ok"] and not done.returncode and not crashes
    return result


if __name__ == "__main__":
    fuzz_one(sys.argv[1], sys.argv[2:])
