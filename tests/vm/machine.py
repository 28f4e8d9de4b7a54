"""Boot the test bed in QEMU and talk to its serial console.

Each ``Machine`` boots the built disk through its own qcow2 overlay (the raw disk stays
pristine, so scenarios cannot pollute each other) with the scenario on the kernel command line.
A firmware bed (``VmBed.firmware``) boots instead through QEMU's firmware (SeaBIOS, or OVMF with
the machine's own copy of its variable store) and the GRUB on its disk, with no -kernel; the
scenario then rides in an SMBIOS OEM string. The overlay and that variable store are the
machine's ``Storage``: a new Machine given the same Storage boots the same machine again after
QEMU was killed (a power cut).
The serial console is a unix socket that QEMU waits on before starting the CPU, so no byte is
lost: a reader thread timestamps every line (host monotonic clock), appends it to
``console.log`` and wakes whoever waits for a marker. Writing to the socket types on the console.

Software emulation (TCG) by default, since CI has no usable KVM; ``DBOOT_VM_ACCEL=kvm`` overrides.
QEMU is our child: on timeout or error it is killed by its own pid, never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.vm.build import VmBed

# Kernel command line: root on the virtio disk, console on the first serial port (the
# architecture's: ttyS0, ttyAMA0), and a panic (PID 1 dying, say) ends the VM at once instead of
# hanging until the timeout.
KERNEL_ARGS = "root=/dev/vda rw console={console} panic=1"
ACCEL = os.environ.get("DBOOT_VM_ACCEL", "tcg")
# systemd's status lines are coloured; markers are matched on the plain text.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
# Lines that mean the scenario cannot go on: stop waiting at once and show them.
FATAL = re.compile(r"Kernel panic|DBOOT-VM: finished")
GUEST_CHECK_PORT = 2222  # `dboot switch --ssh-check`'s port in the guest


class VmError(AssertionError):
    """The machine did not do what a test waited for; the message carries the console's tail."""


@dataclass(frozen=True)
class ConsoleLine:
    index: int  # position in the console, for "after this line" searches
    seconds: float  # host seconds since QEMU was started
    text: str


@dataclass(frozen=True)
class Storage:
    """What a machine keeps across power cycles: its disk, a qcow2 overlay of the bed's disk (the
    cached disk stays pristine), and on UEFI its NVRAM, a copy of OVMF's variable store."""

    overlay: Path
    efi_vars: Path | None = None

    @classmethod
    def create(cls, bed: VmBed, directory: Path) -> Storage:
        """A new machine's: an empty overlay, and OVMF's variable store as shipped."""
        overlay = directory / "overlay.qcow2"
        backing = ["-b", str(bed.disk), "-F", "raw"]
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(overlay)], check=True
        )
        firmware = bed.firmware
        if firmware is None or not firmware.vars_template:
            return cls(overlay)
        efi_vars = directory / "efi-vars.fd"
        shutil.copyfile(firmware.vars_template, efi_vars)
        return cls(overlay, efi_vars)


class Machine:
    """One QEMU run of the test bed. Use as a context manager: it always kills QEMU on exit."""

    def __init__(
        self,
        bed: VmBed,
        scenario: str,
        workdir: Path,
        *,
        memory_mb: int = 2048,
        cpus: int = 2,
        ssh: bool = False,
        reboot: bool = False,
        storage: Storage | None = None,
        vga: bool = False,
    ) -> None:
        """``ssh``: a NIC on QEMU's user network (DHCP), the guest's port 22 forwarded from
        127.0.0.1:``ssh_port`` only, and its port ``GUEST_CHECK_PORT`` (for `dboot switch
        --ssh-check`) from 127.0.0.1:``check_port``. ``reboot``: a guest reboot restarts it
        (by default QEMU exits), with the same kernel command line and the same overlay.
        ``storage``: boot that disk overlay (and NVRAM) again, as another Machine left it;
        by default a new one in ``workdir``, then ``self.storage``. ``vga``: a standard VGA
        card as well, the kernel's console on it first and on the serial port last (as cloud
        kernels have it: /dev/console is the serial port), and QEMU's monitor to read it
        (:meth:`vga_text`); x86 beds with QEMU's kernel only."""
        self.bed, self.scenario, self.workdir = bed, scenario, workdir
        self.vga = vga
        self.storage = storage
        self.memory_mb, self.cpus = memory_mb, cpus
        self.ssh_port = free_loopback_port() if ssh else None
        self.check_port = free_loopback_port() if ssh else None
        self.reboot = reboot
        self.log_path = workdir / "console.log"
        self.lines: list[ConsoleLine] = []
        self._partial = b""
        self._cond = threading.Condition()
        self._closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._started = 0.0
        # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
        self._sockdir = Path(tempfile.mkdtemp(prefix="dboot-vm-"))

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Machine:
        try:
            self.start()
        except BaseException:
            self.stop()  # QEMU may be up although connecting to its console failed
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def started(self) -> float:
        """When QEMU started (``time.monotonic()``): ``ConsoleLine.seconds`` count from here."""
        return self._started

    def qemu_command(self, storage: Storage, console: Path) -> list[str]:
        # Option/value pairs, one per line.
        arch = self.bed.arch
        return [
            arch.qemu,
            *arch.qemu_machine,
            *("-accel", ACCEL),
            *("-m", str(self.memory_mb)),
            *("-smp", str(self.cpus)),
            # No default devices (IDE CD-ROM, VGA, NIC...): fewer drivers to probe under TCG.
            *("-nodefaults", "-nographic"),
            *(() if self.reboot else ("-no-reboot",)),
            *self.nic_options(),
            *self.boot_options(storage),
            # Entropy from the host (see base.sh: virtio_rng is in the initramfs).
            *("-device", "virtio-rng-pci"),
            *("-chardev", f"socket,id=console,path={console},server=on,wait=on"),
            *("-serial", "chardev:console"),
            *self.vga_options(),
        ]

    def vga_options(self) -> tuple[str, ...]:
        if not self.vga:
            return ()
        monitor = self._sockdir / "monitor.sock"
        return ("-device", "VGA", "-monitor", f"unix:{monitor},server=on,wait=off")

    def vga_text(self) -> list[str]:
        """The VGA text window (0xb8000, 32 KiB: every page vgacon may be showing), as lines
        of 80 characters, read through QEMU's monitor from the guest's physical memory."""
        assert self.vga, "a Machine(vga=True) only"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as monitor:
            monitor.connect(str(self._sockdir / "monitor.sock"))
            monitor.settimeout(30)
            _read_until_prompt(monitor)
            monitor.sendall(b"xp /16384xh 0xb8000\n")
            dump = _read_until_prompt(monitor)
        cells = [
            int(value, 16)
            for line in dump.splitlines()
            if re.match(r"^[0-9a-f]+: 0x", line.strip())
            for value in line.split(":", 1)[1].split()
        ]
        text = "".join(chr(cell & 0xFF) if 0x20 <= cell & 0xFF < 0x7F else " " for cell in cells)
        return [text[start : start + 80].rstrip() for start in range(0, len(text), 80)]

    def boot_options(self, storage: Storage) -> tuple[str, ...]:
        """The kernel and scenario on QEMU's command line, or a firmware and its boot disk."""
        firmware = self.bed.firmware
        if firmware is None:
            console = self.bed.arch.console
            kernel_args = KERNEL_ARGS.format(
                console=f"tty0 console={console}" if self.vga else console
            )
            return (
                *("-kernel", str(self.bed.kernel)),
                *("-initrd", str(self.bed.initrd)),
                *("-append", f"{kernel_args} dboot.test={self.scenario}"),
                *("-drive", f"if=virtio,format=qcow2,file={storage.overlay}"),
            )
        pflash: tuple[str, ...] = ()
        if firmware.code:
            assert storage.efi_vars is not None, f"no variable store for {firmware.name}"
            pflash = (
                *("-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}"),
                *("-drive", f"if=pflash,format=raw,unit=1,file={storage.efi_vars}"),
            )
        return (
            *pflash,
            # Read by the guest's dboot-vm-scenario from /sys/firmware/dmi/entries/11-*/raw.
            *("-smbios", f"type=11,value=dboot.test={self.scenario}"),
            *("-drive", f"if=none,id=disk,format=qcow2,file={storage.overlay}"),
            # First in the boot order QEMU hands the firmware (OVMF honours it).
            *("-device", "virtio-blk-pci,drive=disk,bootindex=0"),
        )

    def nic_options(self) -> tuple[str, ...]:
        if self.ssh_port is None:
            return ()
        # restrict=on: the guest reaches neither the host nor the outside; the forward from the
        # host's loopback (and DHCP, served by QEMU itself) still work.
        forward = f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
        forward += f",hostfwd=tcp:127.0.0.1:{self.check_port}-:{GUEST_CHECK_PORT}"
        if self.bed.firmware is None:
            return ("-nic", f"user,model=virtio-net-pci,restrict=on,{forward}")
        # No option ROM (iPXE): the firmware has no network boot to load and try.
        return (
            *("-netdev", f"user,id=net,restrict=on,{forward}"),
            *("-device", "virtio-net-pci,netdev=net,romfile="),
        )

    def start(self) -> None:
        if self.storage is None:
            self.storage = Storage.create(self.bed, self.workdir)
        console = self._sockdir / "console.sock"
        stderr = (self.workdir / "qemu.stderr").open("wb")
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.qemu_command(self.storage, console),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
        stderr.close()
        self._sock = self._connect(console)
        self._reader = threading.Thread(target=self._read_console, name="vm-console", daemon=True)
        self._reader.start()

    def _connect(self, path: Path) -> socket.socket:
        """QEMU waits for us before running the guest: connect as soon as the socket exists."""
        assert self._proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise VmError(
                    f"QEMU exited at start (status {self._proc.returncode}): " + self._qemu_stderr()
                )
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                time.sleep(0.05)
        raise VmError(f"QEMU's console socket {path} did not appear within 30 s")

    def stop(self) -> None:
        """Kill QEMU if it still runs (our child, by pid), then release the socket."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        if self._sock is not None:
            self._sock.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        shutil.rmtree(self._sockdir, ignore_errors=True)

    # --- console ------------------------------------------------------------------------------

    def _read_console(self) -> None:
        assert self._sock is not None
        with self.log_path.open("wb") as log:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except OSError:
                    chunk = b""
                log.write(chunk)
                log.flush()
                with self._cond:
                    if not chunk:
                        self._add_line(self._partial)
                        self._closed = True
                        self._cond.notify_all()
                        return
                    *complete, self._partial = (self._partial + chunk).split(b"\n")
                    for raw in complete:
                        self._add_line(raw)
                    self._cond.notify_all()

    def _add_line(self, raw: bytes) -> None:
        text = ANSI_ESCAPE.sub("", raw.decode("utf-8", "replace"))
        self.lines.append(ConsoleLine(len(self.lines), time.monotonic() - self._started, text))

    def host_time(self, line: ConsoleLine) -> float:
        """When a console line came, on the host's monotonic clock (``time.monotonic()``)."""
        return self._started + line.seconds

    def send(self, text: str) -> None:
        """Type on the serial console (use "\\r" for Enter, as a terminal does)."""
        assert self._sock is not None
        self._sock.sendall(text.encode())

    def find(self, pattern: str, *, after: int = -1) -> ConsoleLine | None:
        """The first console line after line ``after`` where ``pattern`` matches."""
        regex = re.compile(pattern)
        with self._cond:
            return next((ln for ln in self.lines[after + 1 :] if regex.search(ln.text)), None)

    def wait_for(
        self,
        pattern: str,
        timeout: float,
        *,
        after: int = -1,
        fatal: re.Pattern[str] | None = FATAL,
    ) -> ConsoleLine:
        """Wait for a console line matching ``pattern`` (after line ``after``).

        Fails at once, with the console's tail, when the console closes (QEMU exited) or a line
        matching ``fatal`` appears first (a kernel panic, a failed switch).
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = after + 1
        with self._cond:
            while True:
                for line in self.lines[checked:]:
                    if regex.search(line.text):
                        return line
                    if fatal is not None and fatal.search(line.text):
                        raise self.error(f"waiting for /{pattern}/, the console said: {line.text}")
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise self.error(f"QEMU exited before /{pattern}/ appeared")
                if remaining <= 0:
                    raise self.error(f"/{pattern}/ did not appear within {timeout:.0f} s")
                self._cond.wait(min(remaining, 1.0))

    def wait_exit(self, timeout: float) -> int:
        """Wait for the guest to power off (QEMU exits); kill it and fail on timeout."""
        assert self._proc is not None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise self.error(f"the machine did not power off within {timeout:.0f} s") from None

    def text(self, *, after: int = -1) -> str:
        with self._cond:
            return "\n".join(line.text for line in self.lines[after + 1 :])

    def error(self, what: str, tail: int = 40) -> VmError:
        with self._cond:
            last = "\n".join(f"    {line.text}" for line in self.lines[-tail:])
        return VmError(
            f"{what} (scenario {self.scenario}; full console: {self.log_path})\n"
            f"  last {tail} console lines:\n{last}"
        )

    def _qemu_stderr(self) -> str:
        path = self.workdir / "qemu.stderr"
        return path.read_text(errors="replace").strip()[-500:] if path.exists() else ""


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def boot_interactively(bed: VmBed, scenario: str, timeout: float = 900) -> int:
    """Boot one scenario with the console copied to stdout (for `build-vm.sh --boot`)."""
    with (
        tempfile.TemporaryDirectory(prefix="dboot-vm-run-") as work,
        Machine(bed, scenario, Path(work)) as vm,
    ):
        shown = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with vm._cond:
                vm._cond.wait(1.0)
                new, closed = vm.lines[shown:], vm._closed
            for line in new:
                print(f"[{line.seconds:7.2f}] {line.text}", flush=True)
            shown += len(new)
            if closed:
                return vm.wait_exit(30)
        print(f"build-vm: timeout after {timeout:.0f} s", file=sys.stderr)
        return 1


def _read_until_prompt(monitor: socket.socket) -> str:
    """QEMU's human monitor: everything up to its next "(qemu) " prompt."""
    received = b""
    while not received.endswith(b"(qemu) "):
        chunk = monitor.recv(65536)
        if not chunk:
            break
        received += chunk
    return received.decode("ascii", "replace")
