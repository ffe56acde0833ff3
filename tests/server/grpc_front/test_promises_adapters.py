"""README promises about adapters, checked where users meet them (gRPC statuses through the client library, HTTP
statuses, the `quiver` command's exit status and message) on a real server over the tiny served model:

- after DeleteAdapter, Generate naming the adapter is NOT_FOUND (404 over HTTP, exit 1 from `quiver generate`),
  never a base-model answer, while a generation already running on it finishes whole;
- an adapter's own prompt template (shipped in its `quiver_adapter.json`) wraps the last user message of a chat
  request, over gRPC and HTTP: the prompt tokens the server scored are the manual rendering's, and the tokens it
  generates are PEFT's greedy tokens over that rendering;
- P-tuning adapters (PEFT's prompt encoder, saved as its output) register and generate PEFT's tokens.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from quiver.clients.cli import main as cli
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ...adapters.adapter_factory import load_base, load_peft_model, make_p_tuning
from ...served import ADMIN, start
from ...server_thread import ServerThread
from .peft_reference import greedy, prompt_logprobs

PROMPT = "w9 w8 w7"
TEMPLATE = "w9 w9 {input} w8"
CHAT = [{"role": "system", "content": "w4 w4"}, {"role": "user", "content": "w200 w201"}]
# TINY_CHAT_TEMPLATE writes each message's content followed by a space; the adapter's template wraps the user's.
RENDERED = "w4 w4 w9 w9 w200 w201 w8 "
NEW = 12


@pytest.fixture(scope="module")
def server(served_loaded: Any, served_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    srv = start(served_loaded, tmp_path_factory.mktemp("store"), served_adapter_dirs)
    yield srv
    srv.close()


@pytest.fixture
def admin(server: ServerThread) -> Iterator[QuiverClient]:
    with QuiverClient(server.target, admin_token=ADMIN, timeout=60) as client:
        yield client


def ids_of(loaded: Any, text: str) -> list[int]:
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


# -- Generate after DeleteAdapter ---------------------------------------------------------------------------------


def test_generate_after_delete_is_not_found_on_every_front(server: ServerThread, admin: QuiverClient,
                                                           served_adapter_dirs: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]):
    admin.register_adapter(served_adapter_dirs["lora"], "doomed")
    served = admin.generate(PROMPT, adapter="doomed", max_new_tokens=6)  # now loaded in the host and device tiers
    assert served.token_ids != admin.generate(PROMPT, max_new_tokens=6).token_ids  # a base answer would show
    assert [a.ref for a in admin.delete_adapter("doomed")] == ["doomed@1"]

    for ref in ("doomed", "doomed@1"):
        with pytest.raises(QuiverRpcError) as unary:
            admin.generate(PROMPT, adapter=ref, max_new_tokens=6)
        assert unary.value.code == grpc.StatusCode.NOT_FOUND and "doomed" in unary.value.details, ref
        with pytest.raises(QuiverRpcError) as streamed:
            list(admin.generate_stream(PROMPT, adapter=ref, max_new_tokens=6))
        assert streamed.value.code == grpc.StatusCode.NOT_FOUND, ref
    body = {"model": "doomed", "prompt": PROMPT, "max_tokens": 6}
    http = httpx.post(f"{server.http}/v1/completions", json=body, timeout=30)
    assert http.status_code == 404 and http.json()["error"]["code"] == "model_not_found"

    capsys.readouterr()
    assert cli(["generate", "--server", server.target, "--adapter", "doomed", "--max-new-tokens", "4", PROMPT]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: NOT_FOUND: ") and "doomed" in out.err


def test_a_generation_running_at_delete_finishes_and_new_ones_are_not_found(server: ServerThread, admin: QuiverClient,
                                                                            served_adapter_dirs: dict[str, Path]):
    long = 400
    admin.register_adapter(served_adapter_dirs["prefix"], "leaving")
    alone = admin.generate(PROMPT, adapter="leaving", max_new_tokens=long, ignore_eos=True)
    stream = admin.generate_stream(PROMPT, adapter="leaving", max_new_tokens=long, ignore_eos=True)
    tokens = list(next(stream).token_ids)  # it runs
    admin.delete_adapter("leaving")
    assert server.running.engine.num_running == 1  # still running after the delete
    with pytest.raises(QuiverRpcError) as refused:
        admin.generate(PROMPT, adapter="leaving", max_new_tokens=2)
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    chunks = list(stream)
    tokens += [t for chunk in chunks for t in chunk.token_ids]
    assert chunks[-1].finish_reason == "length"
    assert tokens == alone.token_ids  # the running one kept its adapter to the end


# -- an adapter's own prompt template in chat requests -----------------------------------------------------------


@pytest.fixture(scope="module")
def templated(server: ServerThread, served_adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """The lora and prompt adapters, copied with a `quiver_adapter.json` that carries TEMPLATE (as `quiver train`
    ships it) and registered as `templated-<kind>` without a template in the request."""
    out = tmp_path_factory.mktemp("templated")
    dirs = {}
    with QuiverClient(server.target, admin_token=ADMIN) as admin:
        for kind in ("lora", "prompt"):
            copy = Path(shutil.copytree(served_adapter_dirs[kind], out / kind))
            (copy / "quiver_adapter.json").write_text(json.dumps({"prompt_template": TEMPLATE}))
            info = admin.register_adapter(copy, f"templated-{kind}")
            assert info.prompt_template == TEMPLATE
            dirs[kind] = copy
    return dirs


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_chat_through_an_adapters_own_template_renders_and_generates_as_peft(
        server: ServerThread, templated: dict[str, Path], served_base_dir: Path, served_loaded: Any, kind: str):
    manual = [CHAT[0], {"role": "user", "content": TEMPLATE.replace("{input}", CHAT[1]["content"])}]
    rendered = served_loaded.tokenizer.apply_chat_template(manual, tokenize=False, add_generation_prompt=True)
    assert rendered == RENDERED
    ids = ids_of(served_loaded, rendered)
    peft = load_peft_model(served_base_dir, templated[kind])
    expected, expected_logprobs = greedy(peft, ids, NEW), prompt_logprobs(peft, ids)
    assert expected != greedy(load_base(served_base_dir), ids, NEW)  # the adapter matters

    messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT]
    request = pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), adapter=f"templated-{kind}",
                                 stopping=pb.StoppingCriteria(max_new_tokens=NEW), prompt_logprobs=0)
    with grpc.insecure_channel(server.target) as channel:
        reply = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=60)
    assert reply.usage.prompt_tokens == len(ids)
    assert [p.token_id for p in reply.prompt_logprobs] == ids[1:]  # the tokens the server actually ran
    assert [p.logprob for p in reply.prompt_logprobs] == pytest.approx(expected_logprobs, abs=1e-4)
    assert list(reply.token_ids) == expected

    body = {"model": f"templated-{kind}", "messages": CHAT, "max_tokens": NEW, "logprobs": True}
    http = httpx.post(f"{server.http}/v1/chat/completions", json=body, timeout=60).json()
    assert http["usage"]["prompt_tokens"] == len(ids)
    assert http["choices"][0]["message"]["content"] == served_loaded.tokenizer.decode(expected,
                                                                                      skip_special_tokens=True)
    assert [t["token"] for t in http["choices"][0]["logprobs"]["content"]] == [
        served_loaded.tokenizer.decode([t]) for t in expected]

    # The same adapter registered without a template sees the bare chat: three prompt tokens fewer.
    bare = httpx.post(f"{server.http}/v1/chat/completions", json={**body, "model": kind}, timeout=60).json()
    assert bare["usage"]["prompt_tokens"] == len(ids) - 3


# -- P-tuning ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_p_tuning_adapters_are_served_as_peft_generates(server: ServerThread, admin: QuiverClient,
                                                        served_base_dir: Path, served_loaded: Any, tmp_path: Path,
                                                        encoder: str):
    made = make_p_tuning(served_base_dir, tmp_path / "p-tuning", num_virtual_tokens=6, seed=5,
                         encoder_reparameterization_type=encoder)
    assert json.loads((made / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    name = f"ptune-{encoder.lower()}"
    info = admin.register_adapter(made, name)
    assert info.kind == "prompt_tuning" and info.num_virtual_tokens == 6
    peft = load_peft_model(served_base_dir, made)
    for prompt in (PROMPT, "w60 w61 w62 w63"):
        ids = ids_of(served_loaded, prompt)
        expected = greedy(peft, ids, NEW)
        assert expected != greedy(load_base(served_base_dir), ids, NEW)
        reply = admin.generate(prompt, adapter=name, max_new_tokens=NEW)
        assert reply.token_ids == expected, prompt
        assert reply.prompt_tokens == len(ids)  # virtual tokens are not prompt tokens
    body = {"model": name, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0}
    http = httpx.post(f"{server.http}/v1/completions", json=body, timeout=60).json()
    assert http["choices"][0]["text"] == admin.generate(PROMPT, adapter=name, max_new_tokens=NEW).text
