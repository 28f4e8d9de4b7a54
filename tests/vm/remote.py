"""SSH into a test machine as a user would: through its forward on the host's loopback, as root
with the bed's test key, host keys checked strictly against the keys recorded before."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.vm.machine import Machine


class Remote:
    """SSH from the host to the machine through its forwarded loopback port, as root with the
    bed's test key; host keys checked strictly against ``known_hosts``."""

    def __init__(
        self, vm: Machine, key: Path, workdir: Path, *, host_alias: str | None = None
    ) -> None:
        """``host_alias``: the name the host keys are recorded and checked under (ssh's
        HostKeyAlias), by default ``[127.0.0.1]:PORT`` of the machine's forward. A later
        Machine on the same ``Storage`` (the same disk after a power cut) forwards another
        port: its Remote takes this one's ``workdir`` and ``alias``, so its host keys are
        checked against the keys recorded before."""
        assert vm.ssh_port is not None
        self.vm, self.port, self.key = vm, vm.ssh_port, key
        self.known_hosts = workdir / "known_hosts"
        self.alias = host_alias or f"[127.0.0.1]:{self.port}"

    def command(self, remote_command: str, *, check_port: bool = False) -> list[str]:
        """``check_port``: to `dboot switch --ssh-check`'s sshd, whose host key must be the
        one known for the machine's own port 22."""
        port = self.vm.check_port if check_port else self.port
        return [
            "ssh", "-p", str(port), "-o", f"HostKeyAlias={self.alias}", "-i", str(self.key),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "root@127.0.0.1", remote_command,
        ]  # fmt: skip

    def run(self, remote_command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(remote_command), capture_output=True, text=True, timeout=timeout
        )

    def run_check(self, remote_command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(remote_command, check_port=True),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def output(self, remote_command: str) -> str:
        result = self.run(remote_command)
        if result.returncode != 0:
            raise self.vm.error(f"ssh `{remote_command}` failed: {result.stderr.strip()}")
        return result.stdout

    def record_host_keys(self, timeout: float) -> None:
        """known_hosts as the old system presents itself (before the switch)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            scan = subprocess.run(
                ["ssh-keyscan", "-p", str(self.port), "-T", "5", "127.0.0.1"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            keys = [line.split(None, 1) for line in scan.stdout.splitlines() if line.strip()]
            if keys:
                lines = [f"{self.alias} {key}" for _, key in keys]
                self.known_hosts.write_text("\n".join(lines) + "\n")
                return
            time.sleep(1)
        raise self.vm.error(f"no SSH host key on 127.0.0.1:{self.port} within {timeout:.0f} s")

    def wait_login(self, timeout: float, *, root_fs: str) -> float:
        """Log in until it works into a system whose root is of type ``root_fs`` (the old
        system's sshd may still answer for a moment after the switch began); returns the
        host's monotonic time it did."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                result = self.run("findmnt -n -o FSTYPE /", timeout=30)
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0 and result.stdout.strip() == root_fs:
                return time.monotonic()
            last = result.stderr.strip() or f"root is {result.stdout.strip()}"
            if "REMOTE HOST IDENTIFICATION HAS CHANGED" in last or "Host key verification" in last:
                raise self.vm.error(f"the host key changed across the switch: {last}")
            time.sleep(1)
        raise self.vm.error(f"no SSH login within {timeout:.0f} s (last: {last})")
