"""deploy/grafana/quiver.json against Grafana's dashboard model, PromQL, and a live server's /metrics.

A dashboard fails quietly: a panel whose query names a series no server exports just shows "No data", and a
misspelt suffix (`quiver_requests` for `quiver_requests_total`, a histogram's bare name for its `_bucket`) looks
right in review. So this reads every query the dashboard holds (panel targets and template variables), checks each
parses as PromQL (promtool, installed by .ci/run: missing, the test fails rather than skips), pulls out the metric
names it selects, and requires each to be a series name a live Quiver server exposes after base and LoRA calls,
successful and failed, over gRPC and HTTP.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from quiver.clients.client import QuiverClient
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

from ..adapters.adapter_factory import make_lora
from ..conftest import write_tiny_checkpoint
from ..server_thread import ServerThread

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "quiver.json"
GRID_WIDTH = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL's lexer, enough to tell metric names from everything else an expression holds.
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w.])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<variable>\$\{?\w+\}?)
  | (?P<punct>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],@])
""", re.VERBOSE)
# Keywords followed by a parenthesised list of label names, not of expressions.
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# Aggregation operators may take their `by (…)` before the parenthesised expression, so are not always followed by `(`.
_AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                           "topk", "quantile", "limitk", "limit_ratio"})
_KEYWORDS = _LABEL_LISTS | _AGGREGATIONS | {"bool", "and", "or", "unless", "offset", "inf", "nan"}
_CLOSERS = {"{": "}", "[": "]", "(": ")"}
# The series a family of each type exposes (text format 0.0.4: a counter's TYPE line already ends in `_total`).
_SERIES_SUFFIXES = {"counter": ("",), "gauge": ("",), "untyped": ("",), "histogram": ("_bucket", "_count", "_sum"),
                    "summary": ("", "_count", "_sum")}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:]!r} in {expr!r}")
        if match.lastgroup != "space":
            tokens.append((str(match.lastgroup), match.group()))
        pos = match.end()
    return tokens


def _after_group(tokens: list[tuple[str, str]], start: int, expr: str) -> int:
    """The index after the `{…}`, `[…]` or `(label, …)` opened at `start` (none of them nests)."""
    closer = _CLOSERS[tokens[start][1]]
    for i in range(start + 1, len(tokens)):
        kind, text = tokens[i]
        if kind == "name" and text == "__name__":
            raise ValueError(f"a __name__ matcher hides the metric's name from this check: {expr!r}")
        if kind == "punct" and text == closer:
            return i + 1
    raise ValueError(f"unclosed {tokens[start][1]!r} in {expr!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: not functions, aggregations, keywords, label names or values, durations."""
    tokens, names, i = _tokens(expr), set[str](), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if text in ("{", "["):
            if text == "{" and (i == 0 or tokens[i - 1][0] != "name"):
                raise ValueError(f"a selector without a metric name cannot be checked: {expr!r}")
            i = _after_group(tokens, i, expr)
            continue
        if kind == "name":
            word = text.lower()
            if word in _LABEL_LISTS and following == "(":
                i = _after_group(tokens, i + 1, expr)
                continue
            if following != "(" and word not in _KEYWORDS:
                names.add(text)  # a name not called as a function
        i += 1
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL expression by where it is: panel targets, and template variables' `label_values(selector, …)`."""
    queries: dict[str, str] = {}
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries[f"panel {panel['id']} {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: expected label_values(selector, label), got {query!r}"
            queries[f"variable {variable['name']}"] = match.group(1)
    return queries


def as_promql(expr: str) -> str:
    """`expr` with Grafana's variables replaced as Grafana would: interval macros by a duration, others (used in
    regex matchers) by a pattern."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def exposed_series(exposition: str) -> set[str]:
    """The series names an exposition holds: each sample's name, and each declared family's series (a labelled
    family shows no sample until its first observation, e.g. a histogram of adapters before an adapter call)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            assert kind in _SERIES_SUFFIXES, line
            names.update(family + suffix for suffix in _SERIES_SUFFIXES[kind])
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            assert match, line
            names.add(match.group())
    return names


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.9, sum by (le, method) (rate(quiver_request_duration_seconds_bucket{job=~"$job", '
     'method!="Health"}[$__rate_interval])))', {"quiver_request_duration_seconds_bucket"}),
    ("sum(rate(a_total[5m])) by (instance) / on(instance) group_left(model) b_info offset 1h30m",
     {"a_total", "b_info"}),
    ("topk(10, x) > bool 0.5e3 and y unless z or Inf", {"x", "y", "z"}),
    ('vllm:num_requests_waiting{route="/v1/{id}", q=\'a}\'} * 2 + max_over_time(c[5m:30s])',
     {"vllm:num_requests_waiting", "c"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)") - count without (by) (sum_total)', {"up", "sum_total"}),
], ids=["quantile", "matching", "keywords", "strings-subquery", "label-names"])
def test_metric_names_reads_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", ['{job="quiver"}', 'x{__name__=~"quiver_.*"}', "rate(x[5m)"],
                         ids=["no-name", "name-matcher", "unclosed"])
def test_metric_names_refuses_what_it_cannot_check(expr: str) -> None:
    with pytest.raises(ValueError):
        metric_names(expr)


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "quiver" and dashboard["title"]
    assert "__inputs" not in dashboard  # the data source is a variable, chosen on import and in the UI
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys() and all(isinstance(pos[k], int) for k in "hwxy"), panel["title"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= GRID_WIDTH, panel["title"]
        columns, lines = range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        for cell in ((x, y) for x in columns for y in lines):
            assert cell not in cells, f"panel {panel['id']} overlaps panel {cells[cell]}"
            cells[cell] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip() and target["datasource"] == DATASOURCE, (panel["title"], target)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression: Prometheus' own parser, offline."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("`promtool` is not on PATH; .ci/run installs it: apt-get install --no-install-recommends "
                    "prometheus")
    queries = dashboard_queries(load_dashboard())
    rules = [{"record": f"dashboard:query_{i}", "expr": as_promql(expr)} for i, expr in enumerate(queries.values())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A live server over a tiny random Llama with one LoRA adapter registered."""
    from quiver.server.model.model_loader import load_base_model

    base = write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny")
    lora = make_lora(base, tmp_path_factory.mktemp("adapters") / "lora", r=4, target_modules="all-linear", seed=1)
    loaded = load_base_model(ModelConfig(model=str(base), device="cpu", quantize="none",
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
    store = tmp_path_factory.mktemp("store")
    srv = ServerThread(loaded, store, EngineConfig(max_lora_rank=8), AdapterConfig(store=str(store)))
    try:
        with QuiverClient(srv.target, timeout=60) as client:
            client.register_adapter(lora, "lora")
        yield srv
    finally:
        srv.close()


def run_calls(server: ServerThread) -> None:
    """Base and LoRA calls over gRPC (unary and stream) and HTTP, and a failed one on each front."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stopping = pb.StoppingCriteria(max_new_tokens=3)
        for adapter in ("", "lora"):
            stub.Generate(pb.GenerateRequest(text="w1 w2", adapter=adapter, stopping=stopping), timeout=60)
            list(stub.GenerateStream(pb.GenerateStreamRequest(text="w3", adapter=adapter, stopping=stopping),
                                     timeout=60))
        with pytest.raises(grpc.RpcError) as failed:
            stub.Generate(pb.GenerateRequest(text="w1", adapter="no-such-adapter", stopping=stopping), timeout=60)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    for model, status in (("tiny", 200), ("lora", 200), ("no-such-adapter", 404)):
        body = {"model": model, "prompt": "w4 w5", "max_tokens": 3}
        assert httpx.post(f"{server.http}/v1/completions", json=body, timeout=60).status_code == status, model


def test_every_metric_the_dashboard_queries_is_exposed(server: ServerThread) -> None:
    run_calls(server)
    used: dict[str, list[str]] = {}
    for where, expr in dashboard_queries(load_dashboard()).items():
        for name in metric_names(expr):
            used.setdefault(name, []).append(where)
    assert len(used) > 20  # the reader finds the dashboard's names, not nothing
    for endpoint in (f"http://127.0.0.1:{server.running.metrics_port}/metrics", f"{server.http}/metrics"):
        exposed = exposed_series(httpx.get(endpoint, timeout=10).text)
        missing = {name: used[name] for name in sorted(used.keys() - exposed)}
        assert not missing, f"{endpoint} lacks {len(missing)} series the dashboard queries:\n" + "\n".join(
            f"  {name}: {', '.join(where)}" for name, where in missing.items())
