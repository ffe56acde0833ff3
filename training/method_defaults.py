"""The choices a user leaves unset, decided per method, so that data, fields, an instruction and a budget are
enough for a good adapter. Each choice was measured on DialogSum's dev split; training/README.md has the table
and the runs behind it.

- prefix-tuning trains through the MLP reparametrisation (Li & Liang) unless the user gives an initialisation text
  or --no-prefix-projection: of the three ways measured, it reached the lowest held-out loss.
- prompt-tuning and a projection-less prefix start from the instruction's text when no --init-text is given
  (Lester et al.: text initialisation beats random at small scale; measured so here), unless
  --no-init-from-instruction.
"""

from __future__ import annotations

import dataclasses

from quiver.training.config import DataConfig, MethodConfig

SOFT_METHODS = ("prompt-tuning", "prefix-tuning")


def with_defaults(method: MethodConfig, data: DataConfig) -> MethodConfig:
    """`method` with its unset choices decided for `data`: the prefix projection (None -> on unless an init text
    is given) and the init text (the instruction, where the method takes one). Idempotent."""
    prefix = method.method == "prefix-tuning"
    projection = method.projects if prefix else method.prefix_projection
    init_text = method.init_text
    takes_text = method.method == "prompt-tuning" or (prefix and not projection)
    if init_text is None and takes_text and method.init_from_instruction and (data.instruction or "").strip():
        init_text = data.instruction
    return dataclasses.replace(method, prefix_projection=projection, init_text=init_text)
