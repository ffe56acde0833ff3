"""quiver_adapter.json: round trips, strict parsing, field checks, prompt templates, file digests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from quiver.adapters.metadata import (
    JSON_TYPES,
    METADATA_FILE,
    AdapterMetadata,
    sha256_file,
    utc_now,
    validate_prompt_template,
)
from quiver.common.errors import InvalidArgument

SHA = "ab" * 32


def lora(**overrides: Any) -> AdapterMetadata:
    fields: dict[str, Any] = {
        "name": "sentiment",
        "version": 3,
        "kind": "lora",
        "peft_type": "LORA",
        "base_fingerprint": "sha256:" + "0" * 64,
        "base_architecture": "LlamaForCausalLM",
        "size_bytes": 1234,
        "num_parameters": 4096,
        "rank": 8,
        "num_virtual_tokens": None,
        "target_modules": ("q_proj", "v_proj"),
        "sha256": SHA,
        "created_at": "2025-01-02T03:04:05+00:00",
    }
    return AdapterMetadata(**{**fields, **overrides})


def prompt(**overrides: Any) -> AdapterMetadata:
    base = {"kind": "prompt_tuning", "peft_type": "PROMPT_TUNING", "rank": None, "num_virtual_tokens": 20}
    return lora(**{**base, "target_modules": (), **overrides})


@pytest.mark.parametrize(
    "metadata",
    [
        lora(),
        lora(description="Sentiment → labels ✓", extra={"team": "nlp", "ticket": "Q-1"}),
        prompt(prompt_template="Classify: {input}\nAnswer {{json}}:"),
        prompt(kind="prefix_tuning", peft_type="PREFIX_TUNING", num_virtual_tokens=1),
    ],
)
def test_json_round_trip(metadata: AdapterMetadata) -> None:
    text = metadata.to_json()
    assert AdapterMetadata.from_json(text) == metadata
    document = json.loads(text)
    assert document["schema_version"] == 1
    assert list(document) == sorted(document)
    assert text.startswith('{\n  "')


def test_json_types_cover_exactly_the_dataclass_fields() -> None:
    assert set(JSON_TYPES) == {f.name for f in dataclasses.fields(AdapterMetadata)}


def test_metadata_is_frozen_hashable_and_copies_its_inputs() -> None:
    labels = {"a": "1"}
    modules = ["q_proj"]
    metadata = lora(extra=labels, target_modules=modules)
    labels["b"] = "2"
    modules.append("k_proj")
    assert metadata.extra == {"a": "1"}
    assert metadata.target_modules == ("q_proj",)
    assert hash(metadata) == hash(lora(extra={"other": "x"}, target_modules=("q_proj",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        metadata.version = 4  # type: ignore[misc]


def _document(**changes: Any) -> str:
    document = json.loads(lora().to_json())
    document.update(changes)
    return json.dumps(document)


def _without(key: str) -> str:
    document = json.loads(lora().to_json())
    del document[key]
    return json.dumps(document)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "Expecting value"),
        ("[]", "JSON object"),
        (_document(schema_version=2), "schema_version"),
        (_document(schema_version=True), "schema_version"),
        (_document(schema_version="1"), "schema_version"),
        (_without("schema_version"), "schema_version"),
        (_document(surprise=1), "unknown key 'surprise'"),
        (_without("sha256"), "missing key 'sha256'"),
        (_document(version="3"), "'version' has the wrong type str"),
        (_document(version=True), "'version' has the wrong type bool"),
        (_document(size_bytes=1.5), "'size_bytes' has the wrong type float"),
        (_document(rank="8"), "'rank' has the wrong type"),
        (_document(target_modules="q_proj"), "'target_modules' has the wrong type"),
        (_document(target_modules=[1]), "'target_modules' has the wrong type"),
        (_document(extra={"a": 1}), "'extra' has the wrong type"),
        (_document(extra=[]), "'extra' has the wrong type"),
        (_document(description=None), "'description' has the wrong type"),
        (_document(kind="ia3"), "kind"),
        (_document(version=0), "version"),
        (_document(name="../x"), "name"),
        (_document(sha256="AB" * 32), "sha256"),
        (_document(prompt_template="no placeholder"), "prompt_template"),
    ],
)
def test_from_json_is_strict(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        AdapterMetadata.from_json(text)


def test_from_json_lists_every_problem_at_once() -> None:
    document = json.loads(lora().to_json())
    del document["rank"]
    document["bogus"] = 1
    document["version"] = "x"
    with pytest.raises(ValueError) as caught:
        AdapterMetadata.from_json(json.dumps(document))
    message = str(caught.value)
    assert METADATA_FILE in message
    assert all(part in message for part in ("'bogus'", "'rank'", "'version'"))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"version": 0}, "version"),
        ({"kind": "ia3"}, "kind"),
        ({"peft_type": ""}, "peft_type"),
        ({"size_bytes": -1}, "size_bytes"),
        ({"num_parameters": True}, "num_parameters"),
        ({"rank": None}, "rank"),
        ({"rank": 0}, "rank"),
        ({"num_virtual_tokens": 4}, "num_virtual_tokens"),
        ({"target_modules": ("",)}, "target_modules"),
        ({"sha256": "ab" * 31}, "sha256"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": "2025-01-02T03:04:05+02:00"}, "created_at"),
        ({"created_at": "2025-01-02T03:04:05"}, "created_at"),  # naive: zone unknown
        ({"description": "x" * 5000}, "description"),
        ({"extra": {"": "v"}}, "extra"),
        ({"extra": {f"k{i}": "v" for i in range(65)}}, "extra"),
    ],
)
def test_invalid_fields_raise_invalid_argument_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        lora(**overrides)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_virtual_tokens": None}, "num_virtual_tokens"),
        ({"rank": 8}, "rank"),
        ({"target_modules": ("q_proj",)}, "target_modules"),
    ],
)
def test_soft_prompt_fields_follow_the_kind(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        prompt(**overrides)
    assert caught.value.field == field


def test_created_at_accepts_utc_forms() -> None:
    assert lora(created_at="2025-01-02T03:04:05Z").created_at.endswith("Z")
    assert lora(created_at=utc_now()).created_at.endswith("+00:00")


@pytest.mark.parametrize(
    "template", ["{input}", "Q: {input}\nA:", "{{literal}} {input} }}", 'Text:\n{input}\n\nJSON {{"label": ...}}']
)
def test_valid_prompt_templates(template: str) -> None:
    assert validate_prompt_template(template) == template


@pytest.mark.parametrize(
    "template",
    [
        "",
        "no placeholder",
        "{input} and {input}",
        "{}",
        "{0}",
        "{other}",
        "{input} {other}",
        "{input!r}",
        "{input:>10}",
        "{input.attr}",
        "{input[0]}",
        "{input",
        "input}",
        "{ {input}",
        "{input} }",
        "{{input}}",  # escaped braces: no placeholder left
    ],
)
def test_invalid_prompt_templates(template: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_prompt_template(template)
    assert caught.value.field == "prompt_template"
    with pytest.raises(InvalidArgument):
        prompt(prompt_template=template)


def test_apply_template_fills_input_literally() -> None:
    metadata = prompt(prompt_template="Review {{quoted}}: {input} ->")
    assert metadata.apply_template("{input} {0} }") == "Review {quoted}: {input} {0} } ->"
    assert prompt().apply_template("as is {x}") == "as is {x}"


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 17])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
