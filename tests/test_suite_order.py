"""`make test` starts the files that take longest first (tests/conftest.py `longest_files_first`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import UNMEASURED_SLOW_S, longest_files_first


def _item(path: str, name: str, *slow: float, shared: bool = False) -> SimpleNamespace:
    """A test item; its `slow` mark its own, or (`shared`) its module's or class's, which pytest also returns as
    the closest mark but not among the item's own."""
    mark = pytest.mark.slow(*slow).mark if slow != (None,) else None
    closest = {"slow": mark}
    own = [mark] if mark is not None and not shared else []
    return SimpleNamespace(path=Path(path), name=name, get_closest_marker=lambda m: closest.get(m), own_markers=own)


def test_files_are_ordered_by_their_slow_seconds_and_keep_their_own_order() -> None:
    items = [_item("a.py", "a1", None), _item("b.py", "b1", 10), _item("b.py", "b2", None), _item("b.py", "b3", 10),
             _item("c.py", "c1", 25), _item("d.py", "d1", None), _item("e.py", "e1")]  # fmt: skip
    longest_files_first(items)  # type: ignore[arg-type]
    # e: a mark without seconds (UNMEASURED_SLOW_S); c: 25; b: 10 + 10; a and d: unmarked, in collection order
    assert UNMEASURED_SLOW_S > 25
    assert [i.name for i in items] == ["e1", "c1", "b1", "b2", "b3", "a1", "d1"]


def test_a_module_mark_counts_once_for_its_file_not_once_per_test() -> None:
    many_quick = [_item("m.py", f"m{i}", 20, shared=True) for i in range(5)]  # pytestmark = slow(20): 20 s, not 100
    items = [*many_quick, _item("s.py", "s1", 30), _item("t.py", "t1", 15)]
    longest_files_first(items)  # type: ignore[arg-type]
    assert [i.name for i in items] == ["s1", "m0", "m1", "m2", "m3", "m4", "t1"]
