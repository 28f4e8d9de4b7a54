"""The wizard's pure text helpers."""

from __future__ import annotations

from app.format import human_bytes, human_seconds, image_label, plural, short_created, short_id
from app.tui.widgets.run_panels import register_value


def test_sizes_use_binary_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(66 << 20) == "66.0 MiB"
    assert human_bytes(-(50 << 20)) == "-50.0 MiB"


def test_ids_dates_and_labels_read_like_docker_images() -> None:
    assert short_id("sha256:c091039dab46e1a0" + "0" * 48) == "c091039dab46"
    assert short_created("2026-11-29T01:48:07.123456789Z") == "2026-11-29 01:48"
    assert short_created("2026-11-29T03:48:00+02:00") == "2026-11-29 01:48"
    assert short_created("yesterday") == "yesterday"
    assert image_label("tinybox", "latest", "sha256:ab") == "tinybox:latest"
    assert image_label("<none>", "<none>", "sha256:" + "d" * 64) == "d" * 12


def test_durations_and_plurals() -> None:
    assert human_seconds(42.4) == "42 s"
    assert human_seconds(125) == "2 min 5 s"
    assert plural(1, "layer") == "1 layer"
    assert plural(2, "process", "processes") == "2 processes"


def test_registers_show_negative_values_as_such() -> None:
    assert register_value(0x3B) == "0x3b"
    assert register_value((1 << 64) - 38) == "-38"  # -ENOSYS in rax at a syscall entry
