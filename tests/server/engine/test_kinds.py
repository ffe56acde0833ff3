"""The adapter-kind registry: one class per kind the store can hold, each consistent with the device tier."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from quiver.adapters.metadata import ADAPTER_KINDS
from quiver.server.engine.adapter_tiers import DeviceAdapter
from quiver.server.engine.kinds import KINDS


def test_every_stored_kind_has_a_class():
    assert set(KINDS) == set(ADAPTER_KINDS)
    assert all(kind.name == name for name, kind in KINDS.items())


def test_each_kind_lives_in_a_slot_or_a_device_tensor():
    fields = {f.name for f in dataclasses.fields(DeviceAdapter)}
    for kind in KINDS.values():
        assert kind.uses_lora_slot != (kind.tensor_field is not None), kind.name
        assert kind.tensor_field is None or kind.tensor_field in fields, kind.name


def test_virtual_tokens_are_counted_once_and_only_a_soft_prompt_is_computed_in_the_prefill():
    for name, kind in KINDS.items():
        # Only the count is read: a stand-in for the rest of a stored adapter's metadata.
        metadata: Any = SimpleNamespace(kind=name, num_virtual_tokens=None if name == "lora" else 6)
        assert kind.virtual_tokens(metadata) == (0 if name == "lora" else 6), name
        assert kind.prefill_positions(metadata) == (6 if name == "prompt_tuning" else 0), name
