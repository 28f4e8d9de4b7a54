"""The plan: the handoff contract between the injector and the stage."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from initstage.plan import PLAN_VERSION, Plan, PlanError, read_plan, write_plan

OWNER = os.geteuid()  # the tests own their files; the stage itself demands root (0)


def a_plan(**overrides: object) -> Plan:
    fields: dict[str, object] = {
        "new_root": "/run/dboot/root",
        "init_argv": ["/sbin/init", "--log-level=info"],
        "init_env": {"container": "dboot"},
        "console": "vt",
        "grace_seconds": 2.5,
        "api_mounts": True,
        "minimal_dev": False,
    }
    fields.update(overrides)
    return Plan(**fields)  # type: ignore[arg-type]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return state


def write_raw(state_dir: Path, data: object, mode: int = 0o600) -> Path:
    path = state_dir / "plan.json"
    path.write_text(json.dumps(data))
    path.chmod(mode)
    return path


def test_round_trip_keeps_every_field(state_dir: Path):
    plan = a_plan()
    write_plan(plan, state_dir / "plan.json")
    assert read_plan(state_dir / "plan.json", owner_uid=OWNER) == plan


def test_written_plan_is_0600_versioned_json_and_leaves_no_temp_file(state_dir: Path):
    old_umask = os.umask(0)  # a careless umask must not widen the mode
    try:
        write_plan(a_plan(), state_dir / "plan.json")
    finally:
        os.umask(old_umask)
    path = state_dir / "plan.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["version"] == PLAN_VERSION
    assert [p.name for p in state_dir.iterdir()] == ["plan.json"]


def test_rewriting_replaces_the_plan_atomically(state_dir: Path):
    path = state_dir / "plan.json"
    write_plan(a_plan(grace_seconds=1.0), path)
    inode = path.stat().st_ino
    write_plan(a_plan(grace_seconds=7.0), path)
    assert path.stat().st_ino != inode, "rewritten in place instead of renamed over"
    assert read_plan(path, owner_uid=OWNER).grace_seconds == 7.0


def test_defaults_fill_optional_fields(state_dir: Path):
    path = write_raw(state_dir, {"version": 1, "new_root": "/r", "init_argv": ["/sbin/init"]})
    plan = read_plan(path, owner_uid=OWNER)
    assert (plan.console, plan.grace_seconds, plan.log_path) == (
        "inherit",
        3.0,
        "/var/log/dboot.log",
    )
    assert plan.api_mounts and not plan.minimal_dev and plan.init_env == {}


@pytest.mark.parametrize("mode", [0o602, 0o620, 0o666])
def test_group_or_world_writable_plan_is_refused(state_dir: Path, mode: int):
    write_plan(a_plan(), state_dir / "plan.json")
    (state_dir / "plan.json").chmod(mode)
    with pytest.raises(PlanError, match="group- or world-writable"):
        read_plan(state_dir / "plan.json", owner_uid=OWNER)


def test_writable_state_directory_is_refused(state_dir: Path):
    write_plan(a_plan(), state_dir / "plan.json")
    state_dir.chmod(0o777)
    with pytest.raises(PlanError, match=r"plan directory .* world-writable"):
        read_plan(state_dir / "plan.json", owner_uid=OWNER)


def test_plan_owned_by_someone_else_is_refused(state_dir: Path):
    write_plan(a_plan(), state_dir / "plan.json")
    with pytest.raises(PlanError, match=f"owned by uid {OWNER}, not {OWNER + 1}"):
        read_plan(state_dir / "plan.json", owner_uid=OWNER + 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_plan_chowned_away_from_root_is_refused_by_default(state_dir: Path):
    write_plan(a_plan(), state_dir / "plan.json")
    os.chown(state_dir / "plan.json", 65534, 65534)
    with pytest.raises(PlanError, match="owned by uid 65534, not 0"):
        read_plan(state_dir / "plan.json")


def test_symlink_in_place_of_the_plan_is_refused(state_dir: Path, tmp_path: Path):
    write_plan(a_plan(), tmp_path / "elsewhere.json")
    (state_dir / "plan.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(PlanError, match="cannot open plan"):
        read_plan(state_dir / "plan.json", owner_uid=OWNER)


def test_missing_plan_is_refused_with_its_path(state_dir: Path):
    with pytest.raises(PlanError, match=r"cannot open plan .*plan\.json: No such file"):
        read_plan(state_dir / "plan.json", owner_uid=OWNER)


@pytest.mark.parametrize("version", [0, 2, "1", 1.0, None])
def test_unknown_version_is_refused(state_dir: Path, version: object):
    data = json.loads(a_plan().to_json()) | {"version": version}
    with pytest.raises(PlanError, match=r"version .* is unknown"):
        read_plan(write_raw(state_dir, data), owner_uid=OWNER)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"new_root": "run/dboot/root"}, "new_root .* must be an absolute path"),
        ({"init_argv": []}, "init_argv is empty"),
        ({"init_argv": ["sbin/init"]}, r"init_argv\[0\] .* must be an absolute path"),
        ({"init_argv": ["/sbin/init", 3]}, "init_argv must be a list of strings"),
        ({"init_argv": "/sbin/init"}, "field init_argv has type str"),
        ({"init_env": {"A": 1}}, "init_env must map strings to strings"),
        ({"init_env": {"A=B": "c"}}, "key containing '='"),
        ({"console": "serial"}, "console 'serial' is not one of"),
        ({"grace_seconds": -1}, "grace_seconds -1.0 must be >= 0"),
        ({"grace_seconds": True}, "field grace_seconds has type bool"),
        ({"grace_seconds": 3000}, "exceeds 600"),
        ({"api_mounts": "yes"}, "field api_mounts has type str"),
        ({"api_mounts": 1}, "field api_mounts has type int"),
        ({"log_path": "dboot.log"}, "log_path .* must be an absolute path"),
        ({"surprise": 1}, r"unknown fields \['surprise'\]"),
    ],
)
def test_malformed_fields_are_refused(state_dir: Path, change: dict[str, object], message: str):
    data = json.loads(a_plan().to_json()) | change
    with pytest.raises(PlanError, match=message):
        read_plan(write_raw(state_dir, data), owner_uid=OWNER)


def test_missing_required_field_is_refused(state_dir: Path):
    with pytest.raises(PlanError, match=r"lacks the fields \['init_argv'\]"):
        read_plan(write_raw(state_dir, {"version": 1, "new_root": "/r"}), owner_uid=OWNER)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe", ""])
def test_garbage_is_refused(state_dir: Path, text: str):
    path = state_dir / "plan.json"
    path.write_bytes(text.encode("latin-1"))
    path.chmod(0o600)
    with pytest.raises(PlanError, match=r"not valid JSON|not a JSON object"):
        read_plan(path, owner_uid=OWNER)


def test_huge_file_is_refused(state_dir: Path):
    path = state_dir / "plan.json"
    path.write_bytes(b" " * (2 << 20))
    path.chmod(0o600)
    with pytest.raises(PlanError, match="larger than"):
        read_plan(path, owner_uid=OWNER)


def test_write_plan_refuses_an_invalid_plan_and_writes_nothing(state_dir: Path):
    with pytest.raises(PlanError, match="init_argv is empty"):
        write_plan(a_plan(init_argv=[]), state_dir / "plan.json")
    assert list(state_dir.iterdir()) == []


def test_a_plan_says_sandbox_and_a_ten_second_sync_deadline_unless_told(state_dir: Path):
    # An injector that does not know the fields yet gets the careful answers: no
    # superblock is ever remounted read-only, and sync waits at most 10 s without progress.
    path = write_raw(state_dir, {"version": 1, "new_root": "/r", "init_argv": ["/sbin/init"]})
    plan = read_plan(path, owner_uid=OWNER)
    assert plan.machine is False and plan.sync_timeout_seconds == 10.0
    path = write_raw(state_dir, json.loads(a_plan(machine=True, sync_timeout_seconds=3).to_json()))
    plan = read_plan(path, owner_uid=OWNER)
    assert plan.machine is True and plan.sync_timeout_seconds == 3.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sync_timeout_seconds": 0}, "sync_timeout_seconds 0.0 must be > 0"),
        ({"sync_timeout_seconds": 1e9}, "sync_timeout_seconds .* at most 600"),
        ({"sync_timeout_seconds": False}, "field sync_timeout_seconds has type bool"),
        ({"machine": "yes"}, "field machine has type str"),
        ({"machine": 1}, "field machine has type int"),
    ],
)
def test_malformed_new_fields_are_refused(state_dir: Path, change: dict[str, object], message: str):
    data = json.loads(a_plan().to_json()) | change
    with pytest.raises(PlanError, match=message):
        read_plan(write_raw(state_dir, data), owner_uid=OWNER)
