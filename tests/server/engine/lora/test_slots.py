"""Batched multi-LoRA (server/engine/lora/) against PEFT itself: one mixed batch equals PEFT run adapter by adapter,
with each LoRA backend (torch; triton in Triton's interpreter)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.validation import WEIGHTS_FILE, ValidationLimits, validate_adapter
from quiver.common.quantization import keep_nf4_compute_dtype, quantization_config
from quiver.server.engine.lora.backend import LoraBackend, choose_backend
from quiver.server.engine.lora.slots import BatchedLoraLinear, LoraSlots, lora_pairs
from quiver.server.engine.lora.torch_backend import GATHERED, weights_for

from ....adapters.adapter_factory import load_base, load_peft_model, make_lora
from ....conftest import TINY_LLAMA, write_tiny_checkpoint

# name -> make_lora keyword arguments: ranks 2..8, rsLoRA, per-module rank/alpha, subsets and all-linear.
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r2": {"r": 2, "target_modules": ("q_proj", "v_proj"), "seed": 1},
    "all-r4-rslora": {"r": 4, "target_modules": "all-linear", "use_rslora": True, "seed": 2},
    "all-r8-patterns": {
        "r": 8,
        "target_modules": "all-linear",
        "rank_pattern": {"down_proj": 3},
        "alpha_pattern": {"o_proj": 5},
        "seed": 3,
    },
    "mlp-layer1-r6": {"r": 6, "target_modules": ("gate_proj", "up_proj", "down_proj"), "layers_to_transform": [1]},
}
MAX_RANK = 8
ATOL = 1e-5
SEQ_LEN = 5
_STACK_BUFFERS = (".lora_A", ".lora_B")


@dataclass(frozen=True)
class Adapter:
    dir: Path
    tensors: dict[str, torch.Tensor]
    scalings: dict[str, float]
    rank: int


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "tiny", tokenizer=False)


@pytest.fixture(scope="module")
def adapters(base_dir: Path) -> dict[str, Adapter]:
    spec = base_spec_from_checkpoint(base_dir)
    made = {}
    for name, kwargs in ADAPTERS.items():
        adapter_dir = make_lora(base_dir, base_dir.parent / name, **kwargs)
        validated = validate_adapter(adapter_dir, spec, ValidationLimits(max_rank=64))
        assert validated.rank is not None
        tensors = load_file(adapter_dir / WEIGHTS_FILE)
        made[name] = Adapter(adapter_dir, tensors, dict(validated.lora_scalings), validated.rank)
    return made


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, TINY_LLAMA["vocab_size"], (len(ADAPTERS) + 1, SEQ_LEN), generator=generator)  # (B, T)


@pytest.fixture(scope="module")
def base_logits(base_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    return _logits(load_base(base_dir), ids)  # (B, T, V)


@pytest.fixture(scope="module")
def peft_logits(base_dir: Path, adapters: dict[str, Adapter], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adapter name -> PEFT's logits for every row of `ids`, (B, T, V)."""
    return {name: _logits(load_peft_model(base_dir, a.dir), ids) for name, a in adapters.items()}


# With CUDA the Triton kernels run compiled, on CUDA tensors (test_triton_backend.py, test_backend_engine.py).
INTERPRETED = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no CUDA")


@pytest.fixture(params=["torch", pytest.param("triton", marks=INTERPRETED)])
def backend(request: pytest.FixtureRequest) -> LoraBackend:
    """The LoRA math over these CPU models: torch's, or the Triton kernels in Triton's interpreter."""
    return choose_backend(request.param, torch.device("cpu"))


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits  # (B, T, V)


def _slots_with_all(
    model: Any, adapters: dict[str, Adapter], backend: LoraBackend | None = None
) -> tuple[LoraSlots, list[int], list[int]]:
    """LoraSlots over `model` with adapter i in slot i + 1; the batch's rows use slots 1, 2, 0, 3, 4, ..."""
    slots = LoraSlots(model, num_slots=len(adapters) + 1, max_rank=MAX_RANK, backend=backend)
    ranks = [slots.load(i + 1, a.tensors, a.scalings) for i, a in enumerate(adapters.values())]
    assert ranks == [a.rank for a in adapters.values()]
    row_slots = [1, 2, 0, *range(3, len(adapters) + 1)]
    row_ranks = [0 if s == 0 else ranks[s - 1] for s in row_slots]
    slots.set_batch(row_slots, row_ranks, tokens=SEQ_LEN)
    return slots, row_slots, row_ranks


def _assert_rows(
    logits: torch.Tensor, row_slots: list[int], expected: list[torch.Tensor], base: torch.Tensor, atol: float
) -> None:
    names = list(ADAPTERS)
    for row, slot in enumerate(row_slots):
        reference = base if slot == 0 else expected[slot - 1]
        what = "base" if slot == 0 else names[slot - 1]
        diff = (logits[row] - reference[row]).abs().max().item()
        assert torch.allclose(logits[row], reference[row], atol=atol, rtol=0), f"row {row} ({what}): max diff {diff}"


def test_mixed_batch_equals_peft_per_row(
    base_dir: Path,
    adapters: dict[str, Adapter],
    ids: torch.Tensor,
    base_logits: torch.Tensor,
    peft_logits: dict[str, torch.Tensor],
    backend: LoraBackend,
):
    model = load_base(base_dir)
    slots, row_slots, _ = _slots_with_all(model, adapters, backend)
    assert slots.mapping is not None and slots.mapping.rank == MAX_RANK
    logits = _logits(model, ids)
    _assert_rows(logits, row_slots, list(peft_logits.values()), base_logits, ATOL)
    # Adapters differ from the base and from each other, so the check above could fail.
    assert all((ref - base_logits).abs().max() > 1e-2 for ref in peft_logits.values())

    # A batch of only slot 0 skips the LoRA math and is exactly the base.
    slots.set_batch([0] * len(ids), [0] * len(ids), tokens=SEQ_LEN)
    assert slots.mapping is None
    assert torch.equal(_logits(model, ids), base_logits)


@pytest.mark.parametrize(
    ("row_slots", "span", "shared", "segments"),
    [
        ([3, 1, 0, 0, 0], (0, 2), None, 2),
        ([2, 2, 0, 0, 0], (0, 2), 2, 1),
        ([0, 4, 0, 0, 0], (1, 2), 4, 1),
        ([0, 0, 0, 0, 1], (4, 5), 1, 1),
        ([1, 0, 0, 3, 3], (0, 5), None, 2),  # base rows between LoRA rows: no row order is assumed
        ([0, 2, 0, 2, 0], (1, 4), None, 2),  # one adapter with a base row between: two segments, not shared
    ],
)
def test_rows_in_any_order_equal_peft(
    base_dir: Path, adapters: dict[str, Adapter], ids: torch.Tensor, base_logits: torch.Tensor,
    peft_logits: dict[str, torch.Tensor], backend: LoraBackend, row_slots: list[int], span: tuple[int, int],
    shared: int | None, segments: int,
):
    model = load_base(base_dir)
    slots = LoraSlots(model, num_slots=len(adapters), max_rank=MAX_RANK, backend=backend)
    ranks = [slots.load(i + 1, a.tensors, a.scalings) for i, a in enumerate(adapters.values())]
    mapping = slots.set_batch(row_slots, [0 if s == 0 else ranks[s - 1] for s in row_slots], tokens=SEQ_LEN)
    assert mapping is not None and mapping is slots.mapping
    assert (mapping.span, mapping.shared_slot, len(mapping.segments)) == (span, shared, segments)
    assert mapping.span_slots.tolist() == row_slots[span[0]:span[1]]
    assert mapping.token_slots.tolist() == [s for s in row_slots for _ in range(SEQ_LEN)]
    _assert_rows(_logits(model, ids), row_slots, list(peft_logits.values()), base_logits, ATOL)


def test_batch_rank_below_max_uses_only_its_columns(
    base_dir: Path, adapters: dict[str, Adapter], ids: torch.Tensor, peft_logits: dict[str, torch.Tensor],
    backend: LoraBackend,
):
    model = load_base(base_dir)
    slots = LoraSlots(model, num_slots=2, max_rank=MAX_RANK, backend=backend)
    rank = slots.load(2, adapters["qv-r2"].tensors, adapters["qv-r2"].scalings)
    mapping = slots.set_batch([2] * len(ids), [rank] * len(ids), tokens=SEQ_LEN)
    assert mapping is not None and mapping.rank == 2
    assert torch.allclose(_logits(model, ids), peft_logits["qv-r2"], atol=ATOL, rtol=0)


def test_decode_weights_are_gathered_once_and_survive_a_transient_prefill(
    base_dir: Path, adapters: dict[str, Adapter], ids: torch.Tensor,
    base_logits: torch.Tensor, peft_logits: dict[str, torch.Tensor],
):
    model = load_base(base_dir)
    slots, row_slots, row_ranks = _slots_with_all(model, adapters)
    wrapper = next(iter(slots._wrappers.values()))
    gathered = []
    mappings = []
    for _ in range(2):  # two decode steps with the same selection: one mapping, one gather
        mappings.append(slots.set_batch(row_slots, row_ranks, tokens=SEQ_LEN))
        first = _logits(model, ids)
        assert GATHERED in wrapper.scratch
        gathered.append(wrapper.scratch[GATHERED][1])
    assert gathered[0] is gathered[1] and mappings[0] is mappings[1]
    # A prefill of other rows in between (transient), then the same decode selection again.
    slots.set_batch([2, 1, 0, 0, 0], [adapters["all-r4-rslora"].rank, adapters["qv-r2"].rank, 0, 0, 0],
                    tokens=SEQ_LEN, transient=True)
    prefill_logits = _logits(model, ids)
    assert wrapper.scratch[GATHERED][1] is gathered[0]  # kept, not replaced
    _assert_rows(prefill_logits, [2, 1, 0, 0, 0], list(peft_logits.values()), base_logits, ATOL)
    assert slots.set_batch(row_slots, row_ranks, tokens=SEQ_LEN) is mappings[0]
    again = _logits(model, ids)
    assert wrapper.scratch[GATHERED][1] is gathered[0]  # reused, not gathered again
    assert torch.equal(again, first)
    # New weights in a slot: nothing gathered before may be reused.
    slots.load(1, adapters["all-r8-patterns"].tensors, adapters["all-r8-patterns"].scalings)
    slots.set_batch(row_slots, row_ranks, tokens=SEQ_LEN)
    _logits(model, ids)
    assert wrapper.scratch[GATHERED][1] is not gathered[0]
    # No LoRA row left in the decode batch: the kept weights go.
    slots.set_batch([0] * len(ids), [0] * len(ids), tokens=SEQ_LEN)
    assert GATHERED not in wrapper.scratch


def test_decode_keeps_gathered_weights_only_within_gather_bytes(
    base_dir: Path, adapters: dict[str, Adapter], ids: torch.Tensor,
    base_logits: torch.Tensor, peft_logits: dict[str, torch.Tensor],
):
    model = load_base(base_dir)
    slots, row_slots, row_ranks = _slots_with_all(model, adapters)
    assert slots.mapping is not None
    need = slots.gathered_bytes(len(slots.mapping.span_slots), max(row_ranks))
    wrappers = list(slots._wrappers.values())
    # Rising limits: a step under a lower limit would find copies kept under a higher one (same selection).
    for limit, kept in ((0, False), (need - 1, False), (need, True)):
        slots.gather_bytes = limit
        slots._invalidate()  # a new limit applies to the next new mapping
        slots.set_batch(row_slots, row_ranks, tokens=SEQ_LEN)
        _assert_rows(_logits(model, ids), row_slots, list(peft_logits.values()), base_logits, ATOL)
        held = [w.scratch[GATHERED] for w in wrappers if GATHERED in w.scratch]
        assert len(held) == (len(wrappers) if kept else 0), f"limit {limit}"
    held_bytes = sum(a.nbytes + b.nbytes for w in wrappers for _, a, b in [w.scratch[GATHERED]])
    assert held_bytes == need  # the count the limit is checked against is what the wrappers keep


def test_one_shared_adapter_uses_its_slot_in_place(
    base_dir: Path, adapters: dict[str, Adapter], ids: torch.Tensor,
    base_logits: torch.Tensor, peft_logits: dict[str, torch.Tensor],
):
    model = load_base(base_dir)
    slots, _, _ = _slots_with_all(model, adapters)
    wrapper = next(iter(slots._wrappers.values()))
    _logits(model, ids)
    decode_gathered = wrapper.scratch[GATHERED][1]
    shared = [2, 2, 0, 0, 0]
    shared_ranks = [adapters["all-r4-rslora"].rank] * 2 + [0, 0, 0]
    # A prefill of one adapter's rows between decode steps.
    mapping = slots.set_batch(shared, shared_ranks, tokens=SEQ_LEN, transient=True)
    assert mapping is not None and mapping.shared_slot == 2
    a, b = weights_for(wrapper, mapping)
    assert a.untyped_storage().data_ptr() == wrapper.lora_A.untyped_storage().data_ptr()  # views, not copies
    assert b.untyped_storage().data_ptr() == wrapper.lora_B.untyped_storage().data_ptr()
    _assert_rows(_logits(model, ids), shared, list(peft_logits.values()), base_logits, ATOL)
    assert wrapper.scratch[GATHERED][1] is decode_gathered  # the decode's kept
    slots.set_batch(shared, shared_ranks, tokens=SEQ_LEN)  # the decode selection becomes one adapter: copies go
    _assert_rows(_logits(model, ids), shared, list(peft_logits.values()), base_logits, ATOL)
    assert GATHERED not in wrapper.scratch


def _quantized_base(base_dir: Path, scheme: str) -> Any:
    quant = quantization_config(scheme, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, quantization_config=quant, device_map="cpu"
    )
    keep_nf4_compute_dtype(model, "cpu", torch.float32)  # as the server loads it: float32 on every CPU
    return model.eval()


@pytest.mark.parametrize(("scheme", "layer_class"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_base_matches_peft_over_the_same_base(
    base_dir: Path, adapters: dict[str, Adapter], ids: torch.Tensor, scheme: str, layer_class: str,
    backend: LoraBackend,
):
    """Both sides share the quantized base layer's output, so only fp32 rounding of the LoRA term differs."""
    model = _quantized_base(base_dir, scheme)
    slots, row_slots, _ = _slots_with_all(model, adapters, backend)
    wrapper = model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(wrapper, BatchedLoraLinear) and type(wrapper.base_layer).__name__ == layer_class
    assert slots.dtype == wrapper.lora_A.dtype == torch.float32
    logits = _logits(model, ids)

    base = _logits(_quantized_base(base_dir, scheme), ids)
    expected = []
    for a in adapters.values():
        peft_model = PeftModel.from_pretrained(_quantized_base(base_dir, scheme), a.dir).eval()
        wrapped = peft_model.get_submodule(f"base_model.model.{next(iter(a.scalings))}")
        assert type(wrapped).__module__ == "peft.tuners.lora.bnb"  # PEFT's own bnb LoRA layer, on CPU
        expected.append(_logits(peft_model, ids))
    _assert_rows(logits, row_slots, expected, base, ATOL)


def test_clear_and_reload_leave_no_trace(
    base_dir: Path,
    adapters: dict[str, Adapter],
    ids: torch.Tensor,
    base_logits: torch.Tensor,
    peft_logits: dict[str, torch.Tensor],
):
    model = load_base(base_dir)
    slots = LoraSlots(model, num_slots=2, max_rank=MAX_RANK)
    big, small = adapters["all-r8-patterns"], adapters["qv-r2"]
    rows = [1] * len(ids)
    slots.load(1, big.tensors, big.scalings)
    slots.set_batch(rows, [big.rank] * len(ids), tokens=SEQ_LEN)
    assert torch.allclose(_logits(model, ids), peft_logits["all-r8-patterns"], atol=ATOL, rtol=0)

    slots.clear(1)
    assert torch.allclose(_logits(model, ids), base_logits, atol=ATOL, rtol=0)

    slots.load(1, big.tensors, big.scalings)
    rank = slots.load(1, small.tensors, small.scalings)  # replaces r8 on every linear with r2 on q and v
    # Using all columns shows none of the r8 adapter is left.
    slots.set_batch(rows, [MAX_RANK] * len(ids), tokens=SEQ_LEN)
    assert torch.allclose(_logits(model, ids), peft_logits["qv-r2"], atol=ATOL, rtol=0)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert rank == 2 and not q.lora_A[1, 2:].any() and not q.lora_B[1, 2:].any()
    assert not k.lora_A[1].any() and not k.lora_B[1].any()
    q_path = "model.layers.0.self_attn.q_proj"
    scale = small.scalings[q_path]
    a, b = (small.tensors[f"base_model.model.{q_path}.lora_{half}.weight"] for half in "AB")
    assert torch.equal(q.lora_A[1, :2], a) and torch.allclose(q.lora_B[1, :2], b.mT * scale, rtol=0, atol=0)
    # Only the linears an adapter targets run the LoRA math for its rows; k_proj adds nothing for slot 1 now.
    assert q.targeted == {1} and k.targeted == set()
    slots.clear(1)
    assert q.targeted == set()


def test_half_precision_adapter_fills_float32_slots_exactly(base_dir: Path, adapters: dict[str, Adapter]):
    model = load_base(base_dir)
    slots = LoraSlots(model, num_slots=1, max_rank=MAX_RANK)
    adapter = adapters["all-r8-patterns"]
    half = {name: t.to(torch.bfloat16) for name, t in adapter.tensors.items()}
    slots.load(1, half, adapter.scalings)
    path = "model.layers.1.self_attn.o_proj"  # alpha 5, rank 8: a scale of 5/8 rounds in bfloat16
    wrapper = model.get_submodule(path)
    a, b = (half[f"base_model.model.{path}.lora_{x}.weight"] for x in "AB")
    assert wrapper.lora_A.dtype == torch.float32
    assert torch.equal(wrapper.lora_A[1, :8], a.float())
    # The scale is applied in float32, after widening: no bfloat16 rounding of scale * B.
    assert torch.equal(wrapper.lora_B[1, :8], b.mT.float() * adapter.scalings[path])


def test_invalid_loads_raise_and_leave_the_slot_untouched(base_dir: Path, adapters: dict[str, Adapter]):
    model = load_base(base_dir)
    slots = LoraSlots(model, num_slots=2, max_rank=4, target_leaf_names=("q_proj", "v_proj"))
    small = adapters["qv-r2"]
    slots.load(1, small.tensors, small.scalings)
    before = {path: model.get_submodule(path).lora_A[1].clone() for path in slots.module_paths}
    over = adapters["all-r8-patterns"]
    with pytest.raises(ValueError, match="rank 8, over max_rank 4"):
        slots.load(1, over.tensors, over.scalings)
    with pytest.raises(ValueError, match=r"mlp\.up_proj is not a wrapped module"):
        slots.load(1, adapters["all-r4-rslora"].tensors, adapters["all-r4-rslora"].scalings)
    assert all(torch.equal(model.get_submodule(p).lora_A[1], t) for p, t in before.items())
    for bad_slot in (0, 3):
        with pytest.raises(ValueError, match=r"outside 1\.\.2"):
            slots.load(bad_slot, small.tensors, small.scalings)
    with pytest.raises(ValueError, match="not a PEFT LoRA weight"):
        lora_pairs({"prompt_embeddings": torch.zeros(4, 64)})
    only_a = {k: v for k, v in small.tensors.items() if "lora_A" in k}
    with pytest.raises(ValueError, match="only one of lora_A"):
        lora_pairs(only_a)


def test_default_targets_params_slot_bytes_and_unwrap(base_dir: Path, ids: torch.Tensor, base_logits: torch.Tensor):
    model = load_base(base_dir)
    originals = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    param_names = [name for name, _ in model.named_parameters()]
    slots = LoraSlots(model, num_slots=3, max_rank=MAX_RANK)

    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers = TINY_LLAMA["num_hidden_layers"]
    assert slots.module_paths == {p for p in originals if p.rsplit(".", 1)[-1] in leaves}
    assert len(slots.module_paths) == layers * len(leaves) and type(model.lm_head) is torch.nn.Linear
    # The stacks are buffers: the parameters are the base's own, only renamed under base_layer.
    assert [name.replace(".base_layer", "") for name, _ in model.named_parameters()] == param_names
    assert "lora_A" not in "".join(model.state_dict())

    hidden, inter = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]
    kv = hidden // TINY_LLAMA["num_attention_heads"] * TINY_LLAMA["num_key_value_heads"]
    features = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, inter)] * 2
    features.append((inter, hidden))
    per_layer = sum(MAX_RANK * (i + o) for i, o in features)
    assert slots.slot_bytes == 4 * layers * per_layer
    stacks = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(_STACK_BUFFERS))
    assert stacks == slots.slot_bytes * 4  # num_slots + 1 slots

    slots.unwrap()
    assert all(model.get_submodule(path) is module for path, module in originals.items())
    assert [name for name, _ in model.named_parameters()] == param_names
    assert torch.equal(_logits(model, ids), base_logits)
