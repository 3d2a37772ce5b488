"""The message codec against the byte-level captures in the protocol notes (2.7)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.savehelper.messages import (
    CBFLAGS_RESTORE_COLO,
    CBFLAGS_RESTORE_PLAIN,
    CBFLAGS_RESTORE_REMUS,
    CBFLAGS_SAVE_COLO,
    CBFLAGS_SAVE_PLAIN,
    CBFLAGS_SAVE_REMUS,
    DEFAULT_TABLE,
    TABLES,
    HelperCodec,
    ParentCodec,
    ProtocolError,
    callbacks_in,
    cbflag,
    cbflags,
    encode_message,
    table_for,
)

H = bytes.fromhex
STARTING_SAVE = (
    H("3200 0100 01000000 00000000 12000000")
    + b"libxl-save-helper\0"
    + H("0e000000")
    + b"starting save\0"
)


def test_notes_examples_encode_byte_for_byte() -> None:
    c = HelperCodec()
    assert c.message("log", 1, 0, "libxl-save-helper", "starting save") == STARTING_SAVE
    assert len(STARTING_SAVE) == 52
    assert c.message("switch_qemu_logdirty", 7, 1) == H("0a00 0700 07000000 01000000")
    assert c.message("suspend") == H("0200 0300")
    assert c.message("progress", "xc", "Frames", 0x10000, 0x20000) == H(
        "2400 0200 03000000 786300 07000000 4672616d657300 0000010000000000 0000020000000000"
    )
    assert c.message("restore_results", 0xFEFFC, 0xFEFFF) == H(
        "1200 0900 fcef0f0000000000 ffef0f0000000000"
    )
    assert c.message("complete", -1, 5) == H("0a00 0a00 ffffffff 05000000")


def test_parent_decodes_and_replies_only_when_asked() -> None:
    p = ParentCodec()
    p.receive_data(STARTING_SAVE + H("0200 03"))  # log, then half a suspend frame
    msg = p.next_message()
    assert msg is not None and msg.name == "log" and not msg.needs_reply
    assert msg.args == (1, 0, "libxl-save-helper", "starting save")
    assert p.next_message() is None
    with pytest.raises(ProtocolError, match="no message is waiting"):
        p.reply(0)  # an unasked-for int would desynchronise the helper (P-7)
    p.receive_data(H("00"))
    msg = p.next_message()
    assert msg is not None and msg.name == "suspend" and msg.needs_reply
    assert p.reply(1) == H("01000000")
    p.receive_data(H("0a00 0a00 ffffffff 05000000"))
    msg = p.next_message()
    assert msg is not None and msg.args == (-1, 5) and p.reply(0) == bytes(4)


def test_frames_while_a_reply_is_pending_are_a_protocol_error() -> None:
    p = ParentCodec()
    p.receive_data(H("0200 0300") + H("0200 0400"))
    assert p.next_message() is not None
    with pytest.raises(ProtocolError, match="while waiting for the reply to suspend"):
        p.next_message()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (H("0b00"), "unknown message number 11"),
        (H("0100 01000000 00000000 03000000 6162"), "is not a NUL-terminated string"),
        (H("0100 01000000 00000000 00000000"), "is not a NUL-terminated"),
        (H("0700 07000000"), "frame ends inside enable"),
        (H("0300 00"), "1 unexpected bytes"),
        (H("01"), "has no message number"),
    ],
)
def test_malformed_frames(body: bytes, message: str) -> None:
    p = ParentCodec()
    p.receive_data(len(body).to_bytes(2, "little") + body)
    with pytest.raises(ProtocolError, match=message):
        p.next_message()


def test_cbflags_that_libxl_4_17_passes() -> None:
    t = DEFAULT_TABLE
    assert cbflags(t, ["suspend", "switch_qemu_logdirty"]) == CBFLAGS_SAVE_PLAIN == 136
    assert cbflags(t, ["suspend", "postcopy", "checkpoint", "switch_qemu_logdirty"]) == 184
    assert CBFLAGS_SAVE_REMUS == 184
    assert (
        cbflags(t, ["suspend", "postcopy", "checkpoint", "wait_checkpoint", "switch_qemu_logdirty"])
        == CBFLAGS_SAVE_COLO
        == 248
    )
    assert cbflags(t, ["static_data_done", "restore_results"]) == CBFLAGS_RESTORE_PLAIN == 768
    assert CBFLAGS_RESTORE_REMUS == 768 | 32
    assert CBFLAGS_RESTORE_COLO == 888
    assert callbacks_in(t, 888) == {
        "suspend",
        "postcopy",
        "checkpoint",
        "wait_checkpoint",
        "static_data_done",
        "restore_results",
    }


def test_older_tables_are_data() -> None:
    # notes P-2: 4.6 had no wait_checkpoint; logdirty was 6 (cbflag 64)
    assert table_for("4.6") is TABLES["4.6"]
    assert cbflag(TABLES["4.6"], "switch_qemu_logdirty") == 64
    assert [m.name for m in TABLES["4.6"]][-1] == "complete" and len(TABLES["4.6"]) == 8
    with pytest.raises(ValueError):
        cbflag(TABLES["4.6"], "restore_results")  # a fixed message in 4.6, no bit
    # 4.7-4.13: wait_checkpoint 64, logdirty 128, restore_results 256, complete is 9
    t47 = table_for("4.13")
    assert cbflag(t47, "wait_checkpoint") == 64 and cbflag(t47, "restore_results") == 256
    assert encode_message(t47, "complete", 0, 0)[2:4] == H("0900")
    assert table_for("4.17") is DEFAULT_TABLE and table_for("4.20") is DEFAULT_TABLE
    with pytest.raises(ValueError):
        table_for("4.5")


@given(
    st.sampled_from(list(TABLES)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.text(max_size=40).filter(lambda s: "\0" not in s),
    st.text(max_size=40).filter(lambda s: "\0" not in s),
)
def test_roundtrip_every_table(version: str, a: int, b: int, s1: str, s2: str) -> None:
    table = TABLES[version]
    p = ParentCodec(table)
    for spec in table:
        values: list[int | str] = []
        for _, kind in spec.args:
            if kind.value == "s":
                values.append(s1 if not values else s2)
            elif kind.value == "i":
                values.append(a - 2**31)
            elif kind.value == "Q":
                values.append(a * b)
            else:
                values.append(b)
        p.receive_data(encode_message(table, spec.name, *values))
        msg = p.next_message()
        assert msg is not None and msg.name == spec.name and list(msg.args) == values
        if msg.needs_reply:
            p.reply(0)
