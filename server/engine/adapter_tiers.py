"""Adapter tiers sized in bytes: device residency <- host-memory LRU <- the store on disk (as in S-LoRA).

Cold adapters load from the store (safetensors) on a loader thread into a host LRU, so the engine thread never
waits on disk; the engine then copies them into a preallocated device slot (LoRA) or a small device tensor
(soft prompt, prefix) between two steps. Entries in use by running sequences are pinned by a reference count
and are never evicted, so deleting or replacing an adapter in the store never breaks a running request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from quiver.adapters.classifier_head import split_head
from quiver.adapters.registry import WEIGHTS_FILE
from quiver.adapters.safetensors_check import load_safetensors
from quiver.adapters.store import CONFIG_DIGEST, StoredAdapter
from quiver.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from quiver.server.engine.kinds import KINDS
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.observer import EngineObserver, Tier
from quiver.server.engine.pooling import ClassifierHead

log = logging.getLogger(__name__)


@dataclass
class TierStats:
    """Running totals of one tier, read by the metrics endpoint (plain ints: a torn read is harmless)."""

    hits: int = 0
    """Requests whose adapter was already in the tier."""
    misses: int = 0
    """Requests whose adapter was not: each waited for a load (its own, or one already under way)."""
    loads: int = 0
    """Adapters brought into the tier (from the store, or from the host tier onto the device)."""
    evictions: int = 0
    """Adapters dropped to make room."""


@dataclass(frozen=True)
class AdapterKey:
    """Identity of one stored adapter publication: a deleted and re-registered name may reuse a version number,
    so the key also holds the weights' and the config's digests and the registration time."""

    name: str
    version: int
    sha256: str
    config_sha256: str
    created_at: str

    @classmethod
    def of(cls, stored: StoredAdapter) -> AdapterKey:
        m = stored.metadata
        return cls(m.name, m.version, m.sha256, m.extra.get(CONFIG_DIGEST, ""), m.created_at)


@dataclass(frozen=True)
class HostAdapter:
    """An adapter's tensors in host memory, ready to copy to the device."""

    key: AdapterKey
    kind: str  # "lora" | "prompt_tuning" | "prefix_tuning"
    # LoRA: the PEFT state dict; prompt: {"prompt": (P, H)}; prefix: {"prefix": (L, 2, H_kv, P, D)}
    tensors: dict[str, torch.Tensor]
    scalings: dict[str, float]  # LoRA module path -> alpha / r (or alpha / sqrt(r))
    rank: int
    nbytes: int
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # a classifier's {HEAD_WEIGHT: (L, H), HEAD_BIAS?}


def load_host_adapter(stored: StoredAdapter) -> HostAdapter:
    """Read a stored adapter's tensors (safetensors only) into host memory."""
    kind = stored.metadata.kind
    with stored.opened() as path:  # a remote store's files are fetched (and checksummed) into its local cache here
        tensors, scalings = KINDS[kind].load_host(path)
        head = split_head(load_safetensors(path / WEIGHTS_FILE))[0] if stored.metadata.task == "classify" else {}
    return HostAdapter(
        key=AdapterKey.of(stored),
        kind=kind,
        tensors=tensors,
        scalings=scalings,
        rank=stored.metadata.rank or 0,
        nbytes=sum(t.numel() * t.element_size() for t in [*tensors.values(), *head.values()]),
        head=head,
    )


class HostAdapterCache:
    """Thread-safe LRU of host adapters bounded in bytes, filled by one loader thread."""

    def __init__(self, max_bytes: int, loader: Callable[[StoredAdapter], HostAdapter] = load_host_adapter,
                 observer: EngineObserver | None = None) -> None:
        self._max_bytes = max_bytes
        self._loader = loader
        self._observer = observer or EngineObserver()
        self._lock = threading.Lock()
        self._entries: OrderedDict[AdapterKey, HostAdapter] = OrderedDict()
        self._loading: dict[AdapterKey, Future[HostAdapter]] = {}
        self._bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quiver-adapter-loader")
        self.stats = TierStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def resident(self) -> int:
        """Adapters in host memory now."""
        return len(self._entries)

    def holds(self, stored: StoredAdapter) -> bool:
        """Whether `stored` is in host memory now (counts as neither hit nor miss)."""
        with self._lock:
            return AdapterKey.of(stored) in self._entries

    def fetch(self, stored: StoredAdapter) -> Future[HostAdapter]:
        """A future of the host adapter: already done when cached, else loading in the background."""
        key = AdapterKey.of(stored)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                done: Future[HostAdapter] = Future()
                done.set_result(self._entries[key])
                return done
            self.stats.misses += 1
            loading = self._loading.get(key)
            if loading is None or loading.cancelled():  # a waiter cancelled it before it ran: load again
                loading = self._loading[key] = self._pool.submit(self._load, stored)
            return loading

    def _load(self, stored: StoredAdapter) -> HostAdapter:
        key = AdapterKey.of(stored)
        start = time.perf_counter()
        try:
            adapter = self._loader(stored)
        except BaseException as e:  # a failed load is forgotten, so the next request tries again
            with self._lock:
                self._loading.pop(key, None)
            if isinstance(e, FileNotFoundError):  # deleted from the store while the request waited
                raise NotFound(f"adapter {key.name}@{key.version} was deleted") from e
            raise
        self._observer.adapter_loaded(Tier.HOST, time.perf_counter() - start)
        with self._lock:  # one block: a concurrent fetch sees either the load in flight or the entry
            self._loading.pop(key, None)
            if adapter.nbytes > self._max_bytes:
                raise ResourceExhausted(
                    f"adapter {key.name}@{key.version} needs {adapter.nbytes} bytes; --max-host-adapter-bytes "
                    f"is {self._max_bytes}"
                )
            previous = self._entries.pop(key, None)
            self._bytes -= previous.nbytes if previous else 0
            self._entries[key] = adapter
            self._bytes += adapter.nbytes
            self.stats.loads += 1
            while self._bytes > self._max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.evictions += 1
        return adapter

    def drop(self, deleted: list[StoredAdapter]) -> int:
        """Forget adapters deleted from the store, so churn does not keep dead weights until the LRU reaches them;
        how many were held. Requests already submitted hold their own reference (through their fetch's future),
        so they finish on the version they started with."""
        keys = {AdapterKey.of(stored) for stored in deleted}
        with self._lock:
            dropped = [self._entries.pop(key) for key in keys if key in self._entries]
            self._bytes -= sum(adapter.nbytes for adapter in dropped)
        return len(dropped)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class DeviceAdapter:
    """An adapter resident on the device, pinned while `refs` > 0."""

    key: AdapterKey
    kind: str
    nbytes: int
    lora_slot: int = 0  # 0 = no LoRA
    rank: int = 0
    prompt: torch.Tensor | None = None  # (P, H) soft prompt
    prefix: torch.Tensor | None = None  # (L, 2, H_kv, P, D) key/value prefix
    head: ClassifierHead | None = None  # a classification adapter's output layer
    refs: int = field(default=0)


class DeviceAdapters:
    """Device residency, engine thread only: LoRA slots in preallocated stacks, prompts and prefixes as tensors.

    `max_bytes` bounds the LoRA stacks (allocated up front by `lora`, slot 0 included) plus the resident prompts
    and prefixes.
    """

    def __init__(self, lora: LoraSlots, max_bytes: int, device: torch.device, dtype: torch.dtype,
                 observer: EngineObserver | None = None) -> None:
        self._lora = lora
        self._observer = observer or EngineObserver()
        self._device = device
        self._dtype = dtype
        self._tensor_budget = max(0, max_bytes - lora.stack_bytes)
        self._tensor_bytes = 0
        self._head_bytes = 0  # classification heads: kilobytes each, outside both budgets (never refused for)
        self._entries: OrderedDict[AdapterKey, DeviceAdapter] = OrderedDict()
        self._free_slots = list(range(lora.num_slots, 0, -1))
        self._element_size = torch.empty((), dtype=dtype).element_size()
        self.stats = TierStats()

    @property
    def resident(self) -> int:
        return len(self._entries)

    @property
    def slots_used(self) -> int:
        """LoRA slots holding an adapter (of `lora.num_slots`; slot 0, all zeros, is not counted)."""
        return self._lora.num_slots - len(self._free_slots)

    def residents(self) -> list[tuple[AdapterKey, str]]:
        """Every resident adapter's key and kind, most recently used first (engine thread)."""
        return [(key, entry.kind) for key, entry in reversed(self._entries.items())]

    @property
    def nbytes(self) -> int:
        """Device bytes holding resident adapters: occupied LoRA slots plus prompt and prefix tensors."""
        return self.slots_used * self._lora.slot_bytes + self._tensor_bytes + self._head_bytes

    def lookup(self, key: AdapterKey) -> DeviceAdapter | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def has_room(self, stored: StoredAdapter) -> bool:
        """Whether `stored` is resident or could become so now (a free slot, or unpinned entries to evict)."""
        if AdapterKey.of(stored) in self._entries:
            return True
        if KINDS[stored.metadata.kind].uses_lora_slot:
            return bool(self._free_slots) or any(e.refs == 0 and e.lora_slot for e in self._entries.values())
        return self._tensor_fits(stored.metadata.size_bytes)

    def _tensor_fits(self, nbytes: int) -> bool:
        """Whether a prompt/prefix of `nbytes` fits once every unpinned prompt/prefix is evicted."""
        unpinned = sum(e.nbytes for e in self._entries.values() if e.refs == 0 and not e.lora_slot)
        return self._tensor_bytes - unpinned + nbytes <= self._tensor_budget

    def acquire(self, host: HostAdapter) -> DeviceAdapter | None:
        """Pin `host` on the device, loading it if needed; None when everything resident is pinned."""
        slotted = KINDS[host.kind].uses_lora_slot
        if slotted and host.rank > self._lora.max_rank:
            raise FailedPrecondition(
                f"adapter {host.key.name} has rank {host.rank}; this server's LoRA slots hold rank "
                f"{self._lora.max_rank} (--max-lora-rank)"
            )
        if not slotted and self._device_bytes(host) > self._tensor_budget:
            raise ResourceExhausted(
                f"adapter {host.key.name} needs {self._device_bytes(host)} device bytes; only {self._tensor_budget} of "
                "--max-device-adapter-bytes are left beside the LoRA slots"
            )
        entry = self.lookup(host.key)
        if entry is not None:
            self.stats.hits += 1
        else:
            entry = self._load(host)
        if entry is not None:
            entry.refs += 1
        return entry

    def release(self, entry: DeviceAdapter) -> None:
        entry.refs -= 1

    def _device_bytes(self, host: HostAdapter) -> int:
        """Bytes of a prompt/prefix on the device, where it is held in the model's dtype (not the file's)."""
        return sum(t.numel() for t in host.tensors.values()) * self._element_size

    def _load(self, host: HostAdapter) -> DeviceAdapter | None:
        start = time.perf_counter()
        entry = self._place(host)
        if entry is not None and host.head:  # small (labels x hidden): counted, never refused
            try:
                entry.head = ClassifierHead.of(host.head, self._device)
            except BaseException:
                self._unplace(entry)
                raise
            self._head_bytes += entry.head.nbytes
        if entry is not None:
            self._entries[host.key] = entry
            self.stats.loads += 1
            self.stats.misses += 1  # a device miss is retried while the tier is full; counted once, when it loads
            self._observer.adapter_loaded(Tier.DEVICE, time.perf_counter() - start)
        return entry

    def _place(self, host: HostAdapter) -> DeviceAdapter | None:
        """Copy `host` into a free (or freed) LoRA slot or a device tensor; None when no room can be made."""
        kind = KINDS[host.kind]
        if kind.uses_lora_slot:
            if not self._free_slots and not self._evict(lora=True):
                return None
            slot = self._free_slots.pop()
            try:
                rank = self._lora.load(slot, host.tensors, host.scalings)
            except BaseException:
                self._lora.clear(slot)
                self._free_slots.append(slot)
                raise
            entry = DeviceAdapter(host.key, host.kind, self._lora.slot_bytes, lora_slot=slot, rank=rank)
        else:
            nbytes = self._device_bytes(host)
            if not self._tensor_fits(nbytes):
                return None  # evicting now would empty the cache and still not make room
            while self._tensor_bytes + nbytes > self._tensor_budget:
                self._evict(lora=False)
            tensor = next(iter(host.tensors.values())).to(self._device, self._dtype)
            entry = DeviceAdapter(host.key, host.kind, nbytes)
            assert kind.tensor_field is not None, f"{kind.name} holds neither a LoRA slot nor a tensor"
            setattr(entry, kind.tensor_field, tensor)
            self._tensor_bytes += nbytes
        return entry

    def _unplace(self, entry: DeviceAdapter) -> None:
        """Give back what `_place` took for `entry`: its LoRA slot, or its tensor bytes."""
        if entry.lora_slot:
            # No row points at it (unpinned), and the next load overwrites every element: no zeroing.
            self._free_slots.append(entry.lora_slot)
        else:
            self._tensor_bytes -= entry.nbytes

    def _evict(self, *, lora: bool) -> bool:
        """Evict the least recently used unpinned entry of the given sort; False if there is none."""
        for key, entry in self._entries.items():
            if entry.refs == 0 and (entry.lora_slot > 0) == lora:
                del self._entries[key]
                self.stats.evictions += 1
                self._head_bytes -= entry.head.nbytes if entry.head is not None else 0
                self._unplace(entry)
                return True
        return False
