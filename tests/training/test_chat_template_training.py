"""Training through the base's chat template (the default when it has one): a text row is trained as one user turn,
and the server renders a plain request to the adapter, and a chat request through it, to exactly the trainer's
prompt tokens; `--no-chat-template` keeps the raw prompt template on both sides."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from transformers import AutoTokenizer

from quiver.clients.client import QuiverClient
from quiver.server.config import AdapterConfig
from quiver.training.config import DataConfig, MethodConfig, TrainConfig
from quiver.training.data import IGNORE_INDEX, Example, Message, tokenize_example
from quiver.training.train import load_data, train
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ..served import load_served_base
from ..server_thread import ServerThread
from ..tiny import write_tiny_checkpoint
from .test_train import write_rows

TOKEN = "chat-training-token"
INSTRUCTION = "w200 w201"
TEMPLATE = "w200 w201\n\n{input}\n\n"
# Words of their own around each turn and before the answer: a rendering that skipped the template shows.
CHAT_TEMPLATE = ("{% for m in messages %}w250 {{ m['content'] }} w251 {% endfor %}"
                 "{% if add_generation_prompt %}w252 {% endif %}")
TEXT = "w7 w8 w9"


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = write_tiny_checkpoint(tmp_path_factory.mktemp("chat-base") / "tiny", initializer_range=0.2)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    return base


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _trainers_prompt(tokenizer: Any, example: Example) -> list[int]:
    """The prompt tokens the trainer feeds for `example` (those its labels mask)."""
    features = tokenize_example(tokenizer, TEMPLATE, example, 64)
    return [t for t, label in zip(features["input_ids"], features["labels"], strict=True) if label == IGNORE_INDEX]


@pytest.mark.parametrize("chat", [True, False])
def test_text_rows_are_trained_as_a_user_turn_unless_told_not_to(chat_base: Path, tmp_path: Path, chat: bool):
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    (tmp_path / "one.jsonl").write_text(json.dumps({"question": TEXT, "answer": "w3 w4"}) + "\n")
    config = DataConfig(data=(str(tmp_path / "one.jsonl"),), input_field="question", output_field="answer",
                        instruction=INSTRUCTION, eval_fraction=0.0, chat_template=chat)
    data = load_data(config, tokenizer, 0)
    features = data.train[0]
    prompt = [t for t, label in zip(features["input_ids"], features["labels"], strict=True) if label == IGNORE_INDEX]
    turn = [{"role": "user", "content": TEMPLATE.format(input=TEXT)}]
    rendered = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    assert rendered == "w250 w200 w201\n\nw7 w8 w9\n\n w251 w252 "
    assert prompt == _ids(tokenizer, rendered if chat else TEMPLATE.format(input=TEXT))
    assert (data.template, data.chat_template) == (TEMPLATE, chat)


@pytest.fixture(scope="module")
def server(chat_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    loaded = load_served_base(chat_base, tmp_path_factory.mktemp("cache"))
    store = tmp_path_factory.mktemp("store")
    srv = ServerThread(loaded, store, adapter_config=AdapterConfig(store=str(store), admin_token=TOKEN), http_port=0)
    yield srv
    srv.close()


def _served_prompt(server: ServerThread, adapter: str, **prompt: Any) -> list[int]:
    """The prompt tokens the server ran (the first has no log-probability; usage counts it)."""
    request = pb.GenerateRequest(adapter=adapter, stopping=pb.StoppingCriteria(max_new_tokens=1), prompt_logprobs=0,
                                 **prompt)
    with grpc.insecure_channel(server.target) as channel:
        reply = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
    scored = [p.token_id for p in reply.prompt_logprobs]
    assert reply.usage.prompt_tokens == len(scored) + 1
    return scored


@pytest.mark.parametrize("chat", [True, False])
def test_the_server_renders_plain_and_chat_requests_as_the_trainer_did(
    chat_base: Path, server: ServerThread, tmp_path: Path, chat: bool
):
    data = DataConfig(data=(str(write_rows(tmp_path / "train.jsonl", 16)),), input_field="question",
                      output_field="answer", instruction=INSTRUCTION, eval_fraction=0.0, chat_template=chat)
    output = tmp_path / "adapter"
    train(data, MethodConfig(method="lora", rank=2), TrainConfig(output=str(output), model=str(chat_base),
                                                                max_steps=1, batch_size=4))
    assert json.loads((output / "quiver_adapter.json").read_text())["chat_template"] is chat
    name = f"chat-{chat}".lower()
    with QuiverClient(server.target, timeout=60, admin_token=TOKEN) as client:
        assert client.register_adapter(output, name).chat_template is chat  # what AdapterInfo shows users

    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    turn = Example(TEXT, "w3", 1, "t", messages=(Message("user", TEXT),))
    trained = _trainers_prompt(tokenizer, turn if chat else Example(TEXT, "w3", 1, "t"))
    assert _served_prompt(server, name, text=TEXT) == trained[1:]
    if chat:  # a chat request through the adapter: the same turn, the same tokens
        chat_request = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=TEXT)])
        assert _served_prompt(server, name, chat=chat_request) == trained[1:]
        assert _served_prompt(server, "", text=TEXT) == _ids(tokenizer, TEXT)[1:]  # the base: the text as sent
