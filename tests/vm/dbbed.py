"""The x86_64-db bed's disk (issue 19 §2): the remote machine with two busy databases.

Its base tree has PostgreSQL 15 and MariaDB 10.11 from Debian's packages (``packages-db.txt``,
clusters made by their own maintainer scripts). This adds, from ``guest/db/``:
- ``dboot-vm-pgload.service`` and ``dboot-vm-mariaload.service``: numbered commits over each
  database's local socket, every acknowledged number on the console (``dboot-vm-dbload``);
- ``dboot-vm-slowstop.service``: an ``ExecStop=`` that takes 8 s and leaves a marker on the disk;
- ``dboot-vm-dbcheck.service``: on the boot back from a switch, before the databases start,
  PostgreSQL's cluster state and where MariaDB's error log ends; ``dboot-vm-dbreport`` (run by
  the ``dbstop`` scenario) then says whether MariaDB needed crash recovery and what rows each
  table holds;
- MariaDB's error log in a file of its own (Debian's sends it to the journal, which this bed
  keeps in RAM only).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

DB_FILES = Path(__file__).resolve().parent / "guest" / "db"
PROGRAMS = ("dboot-vm-dbload", "dboot-vm-slowstop", "dboot-vm-dbcheck", "dboot-vm-dbreport")
UNITS = (
    "dboot-vm-pgload.service",
    "dboot-vm-mariaload.service",
    "dboot-vm-slowstop.service",
    "dboot-vm-dbcheck.service",
)
PG_CONFIG = "listen_addresses = ''\n"
PG_CTL_CONFIG = "pg_ctl_options = '-t 600'\n"
MARIADB_CONFIG = "[mariadbd]\nlog_error = /var/lib/mysql/dboot-vm-error.log\n"


def make_database_machine(tree: Path, log: Callable[[str], None]) -> None:
    log("the databases' machine: load clients, a slow ExecStop=, the checks of the way back")
    for program in PROGRAMS:
        shutil.copy2(DB_FILES / program, tree / "usr/local/sbin" / program)
        (tree / "usr/local/sbin" / program).chmod(0o755)
    units = tree / "etc/systemd/system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        shutil.copy2(DB_FILES / unit, units / unit)
        (wants / unit).unlink(missing_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    (tree / "etc/mysql/mariadb.conf.d/90-dboot-vm.cnf").write_text(MARIADB_CONFIG)
    # pg_ctl waits 60 s for the server by default: under emulation, with MariaDB starting
    # beside it, that was too short, and the unit failed with the server still starting.
    (tree / "etc/postgresql/15/main/pg_ctl.conf").write_text(PG_CTL_CONFIG)
    # The bed has no /etc/hosts (base.sh): "localhost" does not resolve, and a server that
    # cannot listen on it does not start. The clients use the local socket only.
    (tree / "etc/postgresql/15/main/conf.d/dboot-vm.conf").write_text(PG_CONFIG)
    (tree / "var/lib/dboot-vm").mkdir(parents=True, exist_ok=True)
