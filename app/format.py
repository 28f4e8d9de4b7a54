"""Pure text helpers for both front-ends (dboot and the wizard): sizes, ids, dates,
durations. No Textual; sizes are the engine's own rule (its notices print them too)."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from injector.units import human_bytes

if TYPE_CHECKING:
    from injector.switch import SwitchOptions

__all__ = [
    "command_line",
    "human_bytes",
    "human_seconds",
    "image_label",
    "number_arg",
    "plural",
    "short_created",
    "short_id",
    "size_arg",
]


def short_id(image_id: str) -> str:
    """'sha256:c091039dab46...' -> 'c091039dab46', as `docker images` shows it."""
    return image_id.removeprefix("sha256:")[:12]


def short_created(created: str) -> str:
    """ISO 8601 (any offset) -> 'YYYY-MM-DD HH:MM' in UTC; unparsable text is shown as is."""
    # Without the fraction of a second (the engine gives nanoseconds) and with "+00:00" for
    # "Z": what fromisoformat reads before Python 3.11 too.
    plain = re.sub(r"(:\d\d)\.\d+", r"\1", created, count=1).replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(plain)
    except ValueError:
        return created
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


def human_seconds(seconds: float) -> str:
    """42 -> '42 s', 125 -> '2 min 5 s'."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min {rest} s"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """plural(1, "layer") -> '1 layer', plural(3, "layer") -> '3 layers'."""
    return f"{count} {noun}" if count == 1 else f"{count} {many or noun + 's'}"


def image_label(repository: str, tag: str, image_id: str) -> str:
    """The reference a user would type: 'repo:tag', or the short id for an untagged image."""
    if repository == "<none>" or tag == "<none>":
        return short_id(image_id)
    return f"{repository}:{tag}"


def number_arg(value: float) -> str:
    """5.0 -> '5', 2.5 -> '2.5': the shortest text that reads back as exactly this float."""
    return repr(float(value)).removesuffix(".0")


def size_arg(size: int) -> str:
    """536870912 -> '512M', 3 << 30 -> '3G', 1000 -> '1000': whole units, as one would type."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def command_line(options: SwitchOptions) -> list[str]:
    """The `dboot rehearse|switch|install` words that give the engine these very options
    (``InstallOptions``: install): only the options that differ from the engine's defaults,
    then IMAGE, INIT and its argv.
    ``shlex.join`` of it is ready to paste into a shell. Options a rehearsal does not take
    (carry-over, the keeper's, --target-pid...) are left out of its line; the wizard's own typed
    confirmation has no word (`dboot switch` asks for the hostname itself). A teaching
    rehearsal (one with a pause hook) says --teach."""
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(options)
        if field.default is not dataclasses.MISSING
    }

    def changed(name: str) -> bool:
        return bool(getattr(options, name) != defaults[name])

    from injector.install.install import InstallOptions

    install = isinstance(options, InstallOptions)
    words = ["dboot", "install" if install else "rehearse" if options.rehearse else "switch"]
    if options.rehearse and options.pause is not None:
        words.append("--teach")
    if changed("docker_host") and options.docker_host is not None:
        words += ["--docker-host", options.docker_host]
    if changed("state_dir"):
        words += ["--state-dir", str(options.state_dir)]
    if changed("grace"):
        words += ["--grace", number_arg(options.grace)]
    if options.tmpfs_size is not None:
        words += ["--tmpfs-size", size_arg(options.tmpfs_size)]
    if not options.api_mounts:
        words.append("--no-api-mounts")
    if not options.modules:
        words.append("--no-modules")
    if changed("service_stop"):
        words.append(f"--stop={options.service_stop}")
    if options.stop_timeout is not None:
        words += ["--stop-timeout", number_arg(options.stop_timeout)]
    if not options.rehearse:
        if not options.carry:
            words.append("--no-carry")
        if options.ssh:
            words.append("--ssh")
        if options.revert_after is not None:
            words += ["--revert-after", number_arg(options.revert_after)]
        if options.no_revert:
            words.append("--no-revert")
        if options.ssh_check is not None:
            words += ["--ssh-check", str(options.ssh_check)]
        if options.dry_run:
            words.append("--dry-run")
        if isinstance(options, InstallOptions) and not options.reboot:
            words.append("--no-reboot")
        if options.target_pid is not None:
            words += ["--target-pid", str(options.target_pid)]
    if options.force:
        words.append("--force")
    return [*words, options.image, *options.init_argv]
