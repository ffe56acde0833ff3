"""`quiver data pairs`: preference pairs (prompt, chosen, rejected) for `quiver train --method dpo`, from a server.

For each prompt row, the server (an adapter, or the base model) samples `--samples` completions with seeds
derived from --seed and the prompt, and a judge (quiver.training.judges) scores them: the best is `chosen`, the
worst `rejected`; when they tie, no pair is written. With --reference-field the row's reference is `chosen` and
one sample is `rejected` (the usual pairs against a model's own output, e.g. the base model's summary against a
human one); a sample equal to the reference makes no pair.

The written `prompt` is the row's raw prompt: `quiver train --method dpo` applies the same template
(--instruction) that was applied here to prompt the base model, and an adapter's own stored template is applied
by the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiver.clients.client import QuiverClient
from quiver.common.errors import InvalidArgument
from quiver.training.data import FieldMapping, prompt_template_for
from quiver.training.jsonl import jsonl_lines
from quiver.training.judges import Judge, judge_from_name
from quiver.training.server_options import LocalServer, ServerOptions
from quiver.training.synth import request_seed

log = logging.getLogger(__name__)


@dataclass
class PairsConfig(ServerOptions):
    """What `quiver data pairs` reads, samples and writes; its flags map 1:1 onto these fields."""

    prompts: str | None = field(default=None, metadata={"help": "JSONL file of prompt rows"})
    out: str | None = field(default=None, metadata={"help": "output JSONL of prompt/chosen/rejected rows"})
    prompt_field: str = field(default="prompt", metadata={"help": "the key holding each row's prompt"})
    reference_field: str | None = field(
        default=None, metadata={"help": "the key of a reference completion: chosen = it, rejected = one sample"}
    )
    adapter: str = field(default="", metadata={"help": "adapter that samples (default: the base model)"})
    instruction: str | None = field(
        default=None, metadata={"help": "base model only: a fixed instruction before each prompt, as "
                                "`quiver train --instruction` (pass the same to the DPO run)"}
    )
    judge: str = field(
        default="length:shorter",
        metadata={"help": "length:shorter|longer, keyword:WORD, overlap:FIELD, or a module:function of "
                  "(prompt, completion, row) -> score"},
    )
    samples: int = field(default=2, metadata={"help": "completions sampled per prompt (>= 2 without a reference)"})
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens of each sample"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (0: greedy)"})
    seed: int = field(default=0, metadata={"help": "seed of every sample"})
    limit: int | None = field(default=None, metadata={"help": "use the first N prompt rows only"})

    def __post_init__(self) -> None:
        if not self.prompts or not self.out:
            raise ValueError("--prompts and --out are required (JSONL files)")
        super().__post_init__()
        least = 1 if self.reference_field else 2
        if self.samples < least:
            raise ValueError(f"--samples must be >= {least}" + ("" if self.reference_field else " (pairs need two)"))
        if self.adapter and self.instruction is not None:
            raise ValueError("--instruction is for the base model: an adapter brings its own template")
        if self.temperature == 0 and not self.reference_field:
            raise ValueError("--temperature 0 samples the same completion every time: pairs need > 0 (or a "
                             "--reference-field)")
        if self.temperature < 0 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("--temperature must be >= 0, --max-new-tokens and --limit >= 1")


@dataclass(frozen=True)
class PairsResult:
    prompts: int
    pairs: int
    ties: int


def read_prompt_rows(path: Path, prompt_field: str, reference_field: str | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, row, problem in jsonl_lines(path):
        if problem is not None:
            raise InvalidArgument("prompts", problem)
        wanted = [prompt_field] + ([reference_field] if reference_field else [])
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) or not row[k].strip() for k in wanted):
            raise InvalidArgument("prompts", f"{path}:{number}: needs non-empty string fields {wanted}")
        rows.append(row)
    return rows


def _samples(client: QuiverClient, config: PairsConfig, template: str, row: Mapping[str, Any]) -> list[str]:
    prompt = str(row[config.prompt_field])
    sent = prompt if config.adapter else template.format(input=prompt)
    return [client.generate(sent, adapter=config.adapter, max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature, seed=request_seed(config.seed, prompt, f"sample{i}"),
                            ).text.strip()
            for i in range(config.samples)]


def pair_for(row: Mapping[str, Any], samples: list[str], config: PairsConfig, judge: Judge) -> dict[str, Any] | None:
    """The preference row of one prompt's samples, or None for a tie."""
    prompt = str(row[config.prompt_field])
    if config.reference_field:
        reference = str(row[config.reference_field]).strip()
        rejected = next((s for s in samples if s != reference), None)
        return None if rejected is None else {"prompt": prompt, "chosen": reference, "rejected": rejected}
    scored = sorted(((judge(prompt, s, row), i) for i, s in enumerate(samples)), reverse=True)
    (best, best_i), (worst, worst_i) = scored[0], scored[-1]
    if best == worst or samples[best_i] == samples[worst_i]:
        return None
    return {"prompt": prompt, "chosen": samples[best_i], "rejected": samples[worst_i],
            "chosen_score": best, "rejected_score": worst}


def make_pairs(config: PairsConfig, local_server: LocalServer | None = None) -> PairsResult:
    """Run `quiver data pairs`; the rows land in `config.out` (written whole, in prompt order)."""
    judge = judge_from_name(config.judge)
    rows = read_prompt_rows(Path(str(config.prompts)), config.prompt_field, config.reference_field)
    rows = rows[: config.limit] if config.limit else rows
    template = prompt_template_for(FieldMapping(instruction=config.instruction), "fields")
    with config.connect(local_server) as (client, _), ThreadPoolExecutor(config.concurrency) as pool:
        sampled = list(pool.map(lambda row: _samples(client, config, template, row), rows))
    pairs = [p for row, s in zip(rows, sampled, strict=True) if (p := pair_for(row, s, config, judge)) is not None]
    out = Path(str(config.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    log.info("%d prompts: %d pairs, %d ties", len(rows), len(pairs), len(rows) - len(pairs))
    return PairsResult(len(rows), len(pairs), len(rows) - len(pairs))
