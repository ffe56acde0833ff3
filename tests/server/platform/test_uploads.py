"""Host values onto the device, and row selection by a host index list."""

from __future__ import annotations

import pytest
import torch

from quiver.server.platform.uploads import select_rows, upload

from ..devices import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_upload_gives_the_values_in_the_dtype_on_the_device(device: str) -> None:
    dev = torch.device(device)
    ints = upload([3, -1, 7], torch.long, dev)
    floats = upload([0.5, 2.0], torch.float32, dev)
    from_host = upload(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), torch.long, dev)
    assert ints.device.type == dev.type and ints.dtype == torch.long and ints.tolist() == [3, -1, 7]
    assert floats.dtype == torch.float32 and floats.tolist() == [0.5, 2.0]
    assert from_host.dtype == torch.long and from_host.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("device", DEVICES)
def test_select_rows(device: str) -> None:
    t = torch.arange(12, device=device).view(4, 3)
    assert select_rows(t, [0, 1, 2, 3]) is t  # every row in order: no copy, no upload
    assert torch.equal(select_rows(t, [2, 0]), t[[2, 0]])
    assert torch.equal(select_rows(t, [0, 1]), t[:2])
    assert select_rows(t, []).shape == (0, 3)
