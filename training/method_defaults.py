"""The choices a user leaves unset, decided per method, so that data, fields, an instruction and a budget are
enough for a good adapter. Each choice was measured on DialogSum; training/README.md has the table and the runs
behind it.

Prompt tuning, and prefix tuning without its MLP projection (the default), start from the instruction's text when no
--init-text is given: a soft prompt from its token embeddings (Lester et al.), a prefix from the base model's own
keys and values of it (Li & Liang). Measured so here, both beat a random start; --no-init-from-instruction starts
at random instead.
"""

from __future__ import annotations

import dataclasses

from quiver.training.config import DataConfig, MethodConfig


def with_defaults(method: MethodConfig, data: DataConfig) -> MethodConfig:
    """`method` with its init text decided for `data`: the instruction, where the method takes one and none was
    given. Idempotent."""
    takes_text = method.method == "prompt-tuning" or (method.method == "prefix-tuning" and not method.prefix_projection)
    if method.init_text is None and takes_text and method.init_from_instruction and (data.instruction or "").strip():
        return dataclasses.replace(method, init_text=data.instruction)
    return method
