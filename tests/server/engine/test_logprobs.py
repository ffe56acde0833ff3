"""token_logprobs: only the rows that ask, the model's own log-softmax, each row its own top count."""

from __future__ import annotations

import pytest
import torch

from quiver.server.engine.logprobs import token_logprobs


def test_rows_get_their_own_counts_and_unasked_rows_nothing():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3  # (B, V)
    tokens = torch.tensor([5, 7, 11, 13])
    out = token_logprobs(logits, tokens, [2, None, 0, 5])
    assert out[1] is None
    expected = torch.log_softmax(logits, dim=-1)
    for i, n in ((0, 2), (2, 0), (3, 5)):
        entry = out[i]
        assert entry is not None and entry.token_id == int(tokens[i])
        assert entry.logprob == pytest.approx(expected[i, tokens[i]].item(), abs=1e-6)
        values, ids = expected[i].topk(n) if n else (expected[i, :0], expected[i, :0].long())
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-6)


def test_no_row_asks():
    assert token_logprobs(torch.randn(2, 9), torch.tensor([1, 2]), [None, None]) == [None, None]


def test_more_top_tokens_than_the_vocabulary_returns_them_all():
    out = token_logprobs(torch.randn(1, 5), torch.tensor([2]), [20])
    assert out[0] is not None and len(out[0].top) == 5
