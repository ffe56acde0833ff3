"""The domain services every front translates onto, built once from the configuration: the adapter catalog over
the store, the request builder, and the access policy. The single-process server (server/app.py) and Ray Serve's
deployments (server/ray_serve/) build theirs here, so each rule is configured the same way everywhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.registry import AdapterRegistry
from quiver.adapters.stores import StoreOptions, open_store
from quiver.adapters.validation import ValidationLimits
from quiver.common.errors import FailedPrecondition
from quiver.server.api.access import AccessPolicy
from quiver.server.api.adapter_catalog import AdapterCatalog
from quiver.server.api.request_builder import RequestBuilder, RequestLimits
from quiver.server.config import AdapterConfig, EngineConfig
from quiver.server.model.model_loader import ModelView

log = logging.getLogger(__name__)

API_KEY_ENV = "QUIVER_API_KEY"
ADMIN_TOKEN_ENV = "QUIVER_ADMIN_TOKEN"


def served_model_name(explicit: str | None, model: ModelView) -> str:
    """The base model's id in the HTTP API: --served-model-name, else the model's name without `.gguf`."""
    return explicit or model.name.removesuffix(".gguf")


def adapter_catalog(model: ModelView, config: AdapterConfig, engine_config: EngineConfig, base_id: str
                    ) -> AdapterCatalog:
    """The catalog over the configured store; refuses to start when an adapter holds the base model's id."""
    # Registration refuses what the engine's LoRA slots could not hold: fail at the door, not per request.
    max_rank = min(config.max_rank, engine_config.max_lora_rank)
    limits = ValidationLimits(max_rank=max_rank, max_adapter_bytes=config.max_adapter_bytes)
    store = open_store(StoreOptions(config.store, config.s3_endpoint_url, config.store_cache_dir,
                                    config.store_cache_bytes))
    registry = AdapterRegistry(store, base_spec_from_checkpoint(model.checkpoint_dir), limits)
    import_roots = tuple(Path(root) for root in config.import_roots)
    catalog = AdapterCatalog(registry, model.fingerprint, import_roots, reserved=frozenset({base_id}))
    if taken := catalog.taken_reserved():
        raise FailedPrecondition(f"the store holds an adapter named {taken[0]!r}, the served model's id: "
                                 "set another --served-model-name")
    return catalog


def request_builder(model: ModelView, engine_config: EngineConfig, catalog: AdapterCatalog) -> RequestBuilder:
    limits = RequestLimits(
        context_length=model.context_length,
        max_new_tokens_limit=engine_config.max_new_tokens_limit,
        default_max_new_tokens=engine_config.default_max_new_tokens,
        max_input_tokens=engine_config.max_input_tokens,
    )
    return RequestBuilder(model.tokenizer, limits, catalog.resolve)


def access_policy(api_key: str | None, adapter_config: AdapterConfig) -> AccessPolicy:
    """The server's secrets, from flags or else the environment."""
    policy = AccessPolicy(
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        admin_token=adapter_config.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
    )
    if policy.admin_token is None and policy.api_key is None:
        log.warning("adapter registration and deletion are unprotected (no --admin-token or --api-key)")
    return policy
