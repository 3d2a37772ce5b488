"""The guest's key-value store over plain buffers: layout, dirty marks, reattach."""

from __future__ import annotations

import pytest

from orchestrator.guest.kv import PAGE, SLOT, BadItem, GuestKV


def store(pages: int = 64) -> tuple[bytearray, bytearray, GuestKV]:
    mem, dirty = bytearray(pages * PAGE), bytearray(pages)
    return mem, dirty, GuestKV(memoryview(mem), memoryview(dirty))


def test_put_get_and_overwrite() -> None:
    _, _, kv = store()
    kv.put(b"a", b"1")
    kv.put(b"b", b"2")
    kv.put(b"a", b"3")
    assert kv.get(b"a") == b"3" and kv.get(b"b") == b"2" and kv.get(b"c") is None
    assert kv.keys == 2


def test_marks_exactly_the_pages_written() -> None:
    _, dirty, kv = store()
    dirty[:] = bytes(len(dirty))
    kv.put(b"key", b"value")
    slot, found = kv._find(b"key")
    assert found
    page = (PAGE + slot * SLOT) // PAGE
    assert {i for i, b in enumerate(dirty) if b} == {0, page}


def test_a_new_process_finds_the_data_in_memory() -> None:
    mem, dirty, kv = store()
    for i in range(500):
        kv.put(b"k%d" % i, b"v%d" % i)
    again = GuestKV(memoryview(bytes(mem)), memoryview(bytearray(len(dirty))))
    assert again.keys == 500 and again.get(b"k499") == b"v499"


def test_bad_items() -> None:
    _, _, kv = store()
    with pytest.raises(BadItem):
        kv.put(b"", b"x")
    with pytest.raises(BadItem):
        kv.put(b"k", b"x" * 300)


def test_scratch_dirtying_stays_out_of_the_store() -> None:
    _, dirty, kv = store()
    dirty[:] = bytes(len(dirty))
    kv.dirty_scratch(10)
    marked = {i for i, b in enumerate(dirty) if b}
    assert marked and min(marked) >= kv.scratch_start
