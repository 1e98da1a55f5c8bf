"""The pre-move compatibility check: one worked example per rule, several problems at
once, the compatible case, and processor compatibility turning a CPU mismatch into a pass."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hvstack.errors import InvalidInput
from hvstack.migration.compatibility import (
    CODES,
    DestinationFacts,
    MoveNeeds,
    Problem,
    check,
    format_problems,
)

GIB = 1 << 30

NEEDS = MoveNeeds(
    name="web", vm_id="6f1c0d6e-0000-4000-8000-000000000001", startup_memory=2 * GIB,
    processors=2, cpu_model="host", cpu_features=frozenset({"sse4_2", "avx2", "aes"}),
    machine_type="pc-q35-7.2", generation=2, switches=frozenset({"lan", "dmz"}),
    disk_bytes=10 * GIB, shared_storage=False, shared_root=None, qemu_major=7,
    accelerator="kvm")

DEST = DestinationFacts(
    host="hv2", qemu_version=(7, 2, 0),
    machine_types=frozenset({"pc-q35-7.2", "pc-i440fx-7.2", "pc-q35-7.1"}),
    cpu_models=frozenset({"Nehalem", "Haswell", "qemu64"}),
    cpu_flags=frozenset({"sse4_2", "avx2", "aes", "sse2"}),
    accelerators=frozenset({"kvm", "tcg"}), processors=8,
    switches=frozenset({"lan", "dmz", "backup"}), free_bytes=100 * GIB,
    memory_available=16 * GIB, storage_roots=("/srv/vms", "/mnt/shared/vms"),
    vm_names=frozenset({"db"}), vm_ids=frozenset({"aaaa"}), migration_enabled=True,
    max_simultaneous=2, running_migrations=0)


def codes(needs: MoveNeeds = NEEDS, dest: DestinationFacts = DEST) -> list[str]:
    return [problem.code for problem in check(needs, dest)]


def only(needs: MoveNeeds = NEEDS, dest: DestinationFacts = DEST) -> Problem:
    problems = check(needs, dest)
    assert len(problems) == 1, problems
    return problems[0]


def test_a_compatible_move_has_no_problems() -> None:
    assert check(NEEDS, DEST) == ()
    assert format_problems(()) == ""


def test_passthrough_cpu_needs_every_flag_on_the_destination() -> None:
    problem = only(dest=replace(DEST, cpu_flags=frozenset({"aes", "sse2"})))
    assert problem.code == "cpu-features"
    assert problem.missing == ("avx2", "sse4_2")
    assert problem.message == (
        "the destination's processor lacks avx2, sse4_2; turn on processor compatibility "
        "(hv vm set web --processor-compatibility on) or move to a host that has them")


def test_the_hint_quotes_a_name_a_shell_would_split() -> None:
    problem = only(replace(NEEDS, name="my web"), replace(DEST, cpu_flags=frozenset()))
    assert "hv vm set 'my web' --processor-compatibility on" in problem.message


def test_tcg_max_is_passthrough_too() -> None:
    needs = replace(NEEDS, cpu_model="max", accelerator="tcg")
    assert only(needs, replace(DEST, cpu_flags=frozenset({"aes"}))).code == "cpu-features"


def test_qemu_options_after_the_model_name_are_ignored() -> None:
    needs = replace(NEEDS, cpu_model="host,hv-relaxed,hv-vapic")
    assert check(needs, DEST) == ()
    assert only(needs, replace(DEST, cpu_flags=frozenset())).code == "cpu-features"


def test_processor_compatibility_makes_a_cpu_mismatch_pass() -> None:
    # The destination's processor lacks avx2: passthrough cannot move...
    older = replace(DEST, cpu_flags=frozenset({"sse4_2", "aes", "sse2"}))
    assert codes(dest=older) == ["cpu-features"]
    # ...a baseline model whose flags the older processor has can.
    baseline = replace(NEEDS, cpu_model="Nehalem", cpu_features=frozenset({"sse4_2"}))
    assert check(baseline, older) == ()


def test_a_named_model_must_be_known_on_the_destination() -> None:
    needs = replace(NEEDS, cpu_model="Icelake-Server", cpu_features=frozenset({"avx512f"}))
    problem = only(needs)
    assert (problem.code, problem.missing) == ("cpu-model", ("Icelake-Server",))
    assert "cannot run processor model Icelake-Server" in problem.message


def test_a_named_model_under_kvm_needs_its_flags_on_the_host() -> None:
    needs = replace(NEEDS, cpu_model="Haswell", cpu_features=frozenset({"avx2", "fma"}))
    problem = only(needs)
    assert (problem.code, problem.missing) == ("cpu-features", ("fma",))
    assert "model Haswell needs them" in problem.message
    assert "processor-compatibility" not in problem.message


def test_a_named_model_under_tcg_is_emulated_whatever_the_host_has() -> None:
    needs = replace(NEEDS, cpu_model="Haswell", cpu_features=frozenset({"avx2", "fma"}),
                    accelerator="tcg")
    assert check(needs, replace(DEST, cpu_flags=frozenset())) == ()


def test_the_qemu_major_version_must_match() -> None:
    problem = only(dest=replace(DEST, qemu_version=(8, 0, 2)))
    assert problem.code == "qemu-version"
    assert "QEMU 8.0.2, the source QEMU 7.x" in problem.message
    assert check(NEEDS, replace(DEST, qemu_version=(7, 1, 0))) == ()  # minor may differ


def test_the_machine_type_must_be_supported() -> None:
    needs = replace(NEEDS, machine_type="pc-i440fx-8.0", generation=1)
    problem = only(needs)
    assert (problem.code, problem.missing) == ("machine-type", ("pc-i440fx-8.0",))
    assert "lacks machine type pc-i440fx-8.0 (Generation 1)" in problem.message


def test_the_accelerator_must_be_there() -> None:
    problem = only(dest=replace(DEST, accelerators=frozenset({"tcg"})))
    assert (problem.code, problem.missing) == ("accelerator", ("kvm",))
    assert "runs under kvm and hv2 has only tcg" in problem.message


def test_every_switch_must_exist_by_name() -> None:
    problem = only(dest=replace(DEST, switches=frozenset({"backup"})))
    assert (problem.code, problem.missing) == ("switch", ("dmz", "lan"))
    assert "no virtual switch named dmz, lan" in problem.message
    assert check(replace(NEEDS, switches=frozenset()), replace(DEST, switches=frozenset())) == ()


def test_a_copy_needs_its_bytes_plus_ten_percent() -> None:
    # 10 GiB to copy needs 11 GiB: exactly that is enough, a byte less is not.
    assert check(NEEDS, replace(DEST, free_bytes=11 * GIB)) == ()
    problem = only(dest=replace(DEST, free_bytes=11 * GIB - 1))
    assert problem.code == "storage-room"
    assert problem.message == (
        "copying the disks needs 11 GiB (10 GiB plus 10 %) and hv2 has 11 GiB free; "
        "free space there or pick another --dest-root")
    assert only(dest=replace(DEST, free_bytes=5 * GIB)).message.startswith(
        "copying the disks needs 11 GiB (10 GiB plus 10 %) and hv2 has 5 GiB free")


def test_the_margin_rounds_up() -> None:
    needs = replace(NEEDS, disk_bytes=15)  # 15 + ceil(1.5) = 17
    assert check(needs, replace(DEST, free_bytes=17)) == ()
    assert codes(needs, replace(DEST, free_bytes=16)) == ["storage-room"]


def test_shared_storage_needs_the_root_on_the_destination_not_room() -> None:
    needs = replace(NEEDS, shared_storage=True, shared_root="/mnt/shared/vms/",
                    disk_bytes=0)
    assert check(needs, replace(DEST, free_bytes=0)) == ()
    problem = only(replace(needs, shared_root="/mnt/other"))
    assert (problem.code, problem.missing) == ("shared-root", ("/mnt/other",))
    assert "does not have the shared root /mnt/other" in problem.message


def test_a_shared_move_without_its_root_is_bad_input() -> None:
    with pytest.raises(InvalidInput):
        replace(NEEDS, shared_storage=True, shared_root=None)
    with pytest.raises(InvalidInput):
        replace(NEEDS, disk_bytes=-1)


def test_the_startup_memory_must_be_free() -> None:
    assert check(NEEDS, replace(DEST, memory_available=2 * GIB)) == ()
    problem = only(dest=replace(DEST, memory_available=GIB + GIB // 2))
    assert problem.code == "memory"
    assert "needs 2 GiB to start and hv2 has 1.5 GiB free" in problem.message


def test_the_destination_needs_as_many_processors() -> None:
    problem = only(replace(NEEDS, processors=12))
    assert problem.code == "processors"
    assert "has 12 processors and hv2 only 8" in problem.message


def test_no_vm_with_the_same_name_or_id() -> None:
    assert codes(dest=replace(DEST, vm_names=frozenset({"web"}))) == ["name-clash"]
    problem = only(dest=replace(DEST, vm_ids=frozenset({NEEDS.vm_id})))
    assert (problem.code, problem.missing) == ("id-clash", (NEEDS.vm_id,))


def test_migration_must_be_enabled_and_below_the_limit() -> None:
    assert codes(dest=replace(DEST, migration_enabled=False)) == ["migration-disabled"]
    assert check(NEEDS, replace(DEST, running_migrations=1)) == ()
    problem = only(dest=replace(DEST, running_migrations=2))
    assert problem.code == "too-many-migrations"
    assert "already runs 2 of at most 2 simultaneous moves" in problem.message


def test_every_problem_at_once_in_a_fixed_order() -> None:
    dest = DestinationFacts(
        host="old", qemu_version=(6, 2, 0), machine_types=frozenset({"pc-q35-6.2"}),
        cpu_models=frozenset(), cpu_flags=frozenset({"sse2"}),
        accelerators=frozenset({"tcg"}), processors=1, switches=frozenset(),
        free_bytes=GIB, memory_available=GIB, storage_roots=(),
        vm_names=frozenset({"web"}), vm_ids=frozenset({NEEDS.vm_id}),
        migration_enabled=False, max_simultaneous=1, running_migrations=1)
    problems = check(NEEDS, dest)
    assert [problem.code for problem in problems] == [
        code for code in CODES if code not in ("cpu-model", "shared-root")]
    assert check(NEEDS, dest) == problems  # deterministic
    lines = format_problems(problems).splitlines()
    assert len(lines) == len(problems)
    assert lines[0] == ("migration-disabled: old does not accept moves; "
                        "turn it on there (hv host migration enable)")
    shared = replace(NEEDS, shared_storage=True, shared_root="/x", cpu_model="Haswell")
    assert [problem.code for problem in check(shared, dest)][-3:] == [
        "memory", "switch", "shared-root"]
    assert "cpu-model" in codes(shared, dest)
