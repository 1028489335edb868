"""The companion view of one folder: naming per root group equals naming of the whole folder."""

from __future__ import annotations

import random

import pytest

from omnifs import meta
from omnifs.backends.base import ObjectInfo
from omnifs.backends.metafiles import _Dir

_PARTS = ["a", "b", "ab", "a.b", "yaml", "json", "meta", "txt"]


def _random_names(rng: random.Random, n: int) -> list[str]:
    names = set()
    while len(names) < n:
        name = ".".join(rng.choice(_PARTS) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.3:
            name = meta.short_name(name) if rng.random() < 0.5 else meta.full_name(name)
        names.add(name)
    return sorted(names)


def _infos(names: list[str]) -> dict[str, ObjectInfo]:
    return {n: ObjectInfo(f"d/{n}", "file", size=1) for n in names}


@pytest.mark.parametrize("seed", range(40))
def test_grouped_naming_matches_the_whole_folder(seed: int) -> None:
    rng = random.Random(seed)
    names = _random_names(rng, rng.randint(1, 14))
    d = _Dir("d", _infos(names))
    assert d.slots == meta.companion_map(names)
    for main in names:
        assert d.slot_of(main) == next((c for c, m in d.slots.items() if m == main), None)
    owners = d.owners()
    assert len(set(owners.values())) == len(owners)  # one sidecar per main
    for stored, main in owners.items():
        assert stored in names and stored in meta.alternate_names(main)
        assert d.stored_of(main) == stored


@pytest.mark.parametrize("seed", range(40))
def test_adding_a_file_equals_listing_again(seed: int) -> None:
    rng = random.Random(1000 + seed)
    names = _random_names(rng, rng.randint(2, 14))
    new = names.pop(rng.randrange(len(names)))
    before = _Dir("d", _infos(names))
    after = before.with_file(ObjectInfo(f"d/{new}", "file", size=2))
    fresh = _Dir("d", _infos([*names, new]))
    assert after.slots == fresh.slots
    assert after.owners() == fresh.owners()
    assert after.files.keys() == fresh.files.keys()
    assert new not in before.files  # the old view is left as it was
    moves = dict(before.moves_after_adding(after, new))
    for stored, main in before.owners().items():
        slot = fresh.slot_of(main)
        if slot is not None and slot != before.slot_of(main) and slot != stored:
            assert moves.pop(stored) == slot  # every sidecar whose companion name changed is moved
    assert all(fresh.slot_of(before.owners()[stored]) == slot for stored, slot in moves.items())


def test_a_clashing_name_moves_the_sidecar() -> None:
    before = _Dir("d", _infos(["x.yaml", "x.meta.json"]))
    assert before.stored_of("x.yaml") == "x.meta.json"
    after = before.with_file(ObjectInfo("d/x.json", "file"))
    assert after.slot_of("x.yaml") == "x.yaml.meta.json"
    assert before.moves_after_adding(after, "x.json") == [("x.meta.json", "x.yaml.meta.json")]
    assert before.moves_after_adding(before.with_file(ObjectInfo("d/y.json", "file")), "y.json") == []
