"""Embedding throughput, and what embedding rows cost a generation batch, in one process on one engine.

Scenarios (each timed in alternating rounds, medians reported):
- (e0) `--inputs` embedding rows on the base model, submitted at once;
- (e8) the same inputs, row i under LoRA i mod `--adapters` (rank 8 on q and v, all resident): mixed adapters in one
  batch, against e0;
- (g) `--generations` base-model generations of `--max-new-tokens` tokens, alone;
- (g+e) the same generations with the `--inputs` embedding rows submitted beside them: what the prefill-only rows
  cost the generation batch (the wall time to the last generated token, against g);
- (c) the `--inputs` rows classified by a SEQ_CLS LoRA (rank 8 on q and v, 8 labels), and (g+c) beside the
  generations: what classification rows cost the batch (the head adds a (labels x hidden) product per row).

    python -m bench.bench_embed                 # -> bench/results/embed-cpu.json
    python -m bench.bench_embed --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.adapter_maker import AdapterMaker
from bench.engine_runner import run_batch, running_engine
from bench.workload import MODEL_CONFIGS, cache_dir, environment, load_bench_model, prompt_ids
from quiver.adapters.store import StoredAdapter
from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.pooling import EmbedSpec
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams

UNLIMITED_DEVICE_BYTES = 2**40


def embed_requests(prompts: Sequence[tuple[int, ...]], adapters: Sequence[StoredAdapter | None]
                   ) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(), 0, (), adapters[i % len(adapters)], embed=EmbedSpec())
            for i, p in enumerate(prompts)]


def generation_requests(prompts: Sequence[tuple[int, ...]], max_new_tokens: int) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(), max_new_tokens, ()) for p in prompts]


def make_classifier(bm: Any, work: Path, registry: Any) -> StoredAdapter:
    """A SEQ_CLS LoRA with 8 labels for the bench model, randomised as PEFT would leave it after training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from quiver.adapters.registry import RegistrationOptions

    model = AutoModelForSequenceClassification.from_pretrained(bm.checkpoint_dir, num_labels=8, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(str(work / "classifier"))
    labels = tuple(f"topic-{i}" for i in range(8))
    stored: StoredAdapter = registry.register(work / "classifier", RegistrationOptions("classifier", labels=labels))
    return stored


def classify_requests(prompts: Sequence[tuple[int, ...]], classifier: StoredAdapter) -> list[GenerationRequest]:
    return [GenerationRequest(p, SamplingParams(), 0, (), classifier, embed=EmbedSpec.classification())
            for p in prompts]


def median_wall(engine: Engine, batch: Callable[[], list[GenerationRequest]], rounds: int) -> list[float]:
    return [run_batch(engine, batch()).wall_s for _ in range(rounds)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    bm = load_bench_model(args.model_config, cache_dir(args.cache_dir), args.device, "none", "float32")
    with tempfile.TemporaryDirectory(prefix="quiver-bench-embed-") as work:
        maker = AdapterMaker(bm, Path(work))
        loras: list[StoredAdapter | None] = [m.stored for m in maker.make("lora8-qv", args.adapters, "embed").adapters]
        classifier = make_classifier(bm, Path(work), maker.registry)
        prompts = prompt_ids(bm.tokenizer, args.inputs)
        gen_prompts = prompt_ids(bm.tokenizer, args.generations)
        config = EngineConfig(max_lora_rank=8, max_lora_slots=args.adapters, max_running=args.inputs + args.generations,
                              max_device_adapter_bytes=UNLIMITED_DEVICE_BYTES)
        scenarios: dict[str, Callable[[], list[GenerationRequest]]] = {
            "e0": lambda: embed_requests(prompts, [None]),
            "e8": lambda: embed_requests(prompts, loras),
            "g": lambda: generation_requests(gen_prompts, args.max_new_tokens),
            "g+e": lambda: [*generation_requests(gen_prompts, args.max_new_tokens), *embed_requests(prompts, [None])],
            "c": lambda: classify_requests(prompts, classifier),
            "g+c": lambda: [*generation_requests(gen_prompts, args.max_new_tokens),
                            *classify_requests(prompts, classifier)],
        }
        walls: dict[str, list[float]] = {name: [] for name in scenarios}
        with running_engine(bm, config) as engine:
            for batch in scenarios.values():  # warm-up: kernels built for these shapes, adapters on the device
                run_batch(engine, batch())
            for _ in range(args.rounds):
                for name, batch in scenarios.items():
                    walls[name] += median_wall(engine, batch, 1)
    median = {name: statistics.median(w) for name, w in walls.items()}
    results = {
        "inputs": args.inputs, "adapters": args.adapters, "generations": args.generations,
        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "wall_s": {name: [round(w, 4) for w in ws] for name, ws in walls.items()},
        "e0_inputs_per_s": round(args.inputs / median["e0"], 2),
        "e8_inputs_per_s": round(args.inputs / median["e8"], 2),
        "e8_over_e0": round(median["e0"] / median["e8"], 3),
        "g_tokens_per_s": round(args.generations * args.max_new_tokens / median["g"], 2),
        "g_plus_e_over_g_wall": round(median["g+e"] / median["g"], 3),
        "embedding_row_cost_ms": round((median["g+e"] - median["g"]) / args.inputs * 1000, 2),
        "c_inputs_per_s": round(args.inputs / median["c"], 2),
        "c_over_e0": round(median["e0"] / median["c"], 3),
        "g_plus_c_over_g_wall": round(median["g+c"] / median["g"], 3),
        "classification_row_cost_ms": round((median["g+c"] - median["g"]) / args.inputs * 1000, 2),
    }
    return {"environment": environment(bm, "none"), "results": results}


def print_table(report: dict[str, Any]) -> None:
    r = report["results"]
    print(f"\n{r['inputs']} inputs, {r['adapters']} LoRAs, {r['generations']} generations of {r['max_new_tokens']} "
          f"tokens, {r['rounds']} rounds (medians)")
    print(f"{'scenario':<34} {'value':>10}")
    rows = [("e0: base, inputs/s", r["e0_inputs_per_s"]), ("e8: 8 LoRAs mixed, inputs/s", r["e8_inputs_per_s"]),
            ("(e8)/(e0) throughput", r["e8_over_e0"]), ("g: generation tokens/s", r["g_tokens_per_s"]),
            ("(g+e)/(g) wall", r["g_plus_e_over_g_wall"]), ("cost per embedding row (ms)", r["embedding_row_cost_ms"]),
            ("c: classification, inputs/s", r["c_inputs_per_s"]), ("(c)/(e0) throughput", r["c_over_e0"]),
            ("(g+c)/(g) wall", r["g_plus_c_over_g_wall"]),
            ("cost per classification row (ms)", r["classification_row_cost_ms"])]
    for name, value in rows:
        print(f"{name:<34} {value:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir")
    parser.add_argument("--inputs", type=int, default=64, help="embedding rows per batch")
    parser.add_argument("--adapters", type=int, default=8, help="LoRAs the mixed batch cycles through")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 inputs, 4 generations of 8, 1 round")
    parser.add_argument("--out", default="bench/results/embed-cpu.json")
    args = parser.parse_args()
    if args.quick:
        args = argparse.Namespace(**{**vars(args), "inputs": 16, "generations": 4, "max_new_tokens": 8, "rounds": 1,
                                     "out": args.out.replace(".json", "-quick.json")})
    report = run(args)
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
