"""The adapter-kind registry: one class per kind the store can hold, each consistent with the device tier."""

from __future__ import annotations

import dataclasses

from quiver.adapters.metadata import ADAPTER_KINDS
from quiver.server.adapter_tiers import DeviceAdapter
from quiver.server.kinds import KINDS


def test_every_stored_kind_has_a_class():
    assert set(KINDS) == set(ADAPTER_KINDS)
    assert all(kind.name == name for name, kind in KINDS.items())


def test_each_kind_lives_in_a_slot_or_a_device_tensor():
    fields = {f.name for f in dataclasses.fields(DeviceAdapter)}
    for kind in KINDS.values():
        assert kind.uses_lora_slot != (kind.tensor_field is not None), kind.name
        assert kind.tensor_field is None or kind.tensor_field in fields, kind.name
