"""Host-to-device copies on the step path must not wait for the device."""

from __future__ import annotations

import pytest
import torch

from pagedattn.attention.metadata import AttentionMetadata
from pagedattn.transfer import upload


def test_upload_keeps_values_on_the_cpu() -> None:
    t = torch.randint(-1000, 1000, (37,), dtype=torch.int64)
    got = upload(t, "cpu")
    assert got.device.type == "cpu" and torch.equal(got, t)
    meta = AttentionMetadata.build([1, 3], [5, 7], [[4, 9], [2, 8]], 4, "cpu")
    assert meta.slot_mapping.tolist() == [9 * 4, 8 * 4, 8 * 4 + 1, 8 * 4 + 2]  # positions 4; 4, 5, 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_uploads_return_while_the_stream_is_busy() -> None:
    """Queue ~0.5 s of device work, then copy: the host must be back before the work is done
    (a pageable ``.to(device)`` would wait for it), and the values must arrive intact."""
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1e9))  # about half a second of spinning at ~2 GHz
    busy = torch.cuda.Event()
    busy.record()
    values = torch.randint(0, 1 << 30, (513,), dtype=torch.int64)
    got = upload(values, dev)
    meta = AttentionMetadata.build([1, 3], [5, 7], [[4, 9], [2, 8]], 4, dev)
    assert not busy.query(), "an upload waited for the queued device work"
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), values)
    assert meta.seq_lens.tolist() == [5, 7] and meta.block_tables.tolist() == [[4, 9], [2, 8]]
    assert meta.slot_mapping.tolist() == [9 * 4, 8 * 4, 8 * 4 + 1, 8 * 4 + 2]  # positions 4; 4, 5, 6
