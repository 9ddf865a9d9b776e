"""The server fuzzed in process: hostile requests drawn from benchmarks/serve_fuzz.py's hypothesis strategy (valid
and mutated v2 requests, arbitrary JSON and bytes, huge shapes, deep nesting, lying binary length prefixes, gzip
and image bombs, wrong routes), every answer a 4xx with an error or a correct result. 300 examples here
(PMSERVE_FUZZ_EXAMPLES for more); the 5,000-request run against a real server, with slow bodies and its memory, is
the benchmark (BENCHMARKS.md, RELIABILITY)."""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.test_export import bundle, run  # noqa: F401 -- the tiny text run and its bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_fuzz import IMAGE, TEXT, Req, hostile, verdict  # noqa: E402


@pytest.fixture(scope="module")
def app_client(bundle, digits):  # noqa: F811
    from fastapi.testclient import TestClient

    from pmserve.serving.app import create_app
    from pmserve.serving.config import ServeConfig
    from pmserve.serving.model import load_models

    cfg = ServeConfig(provider="cpu", threads=1)
    with TestClient(create_app(load_models([bundle, digits], [TEXT, IMAGE], cfg), cfg, loopback=True)) as c:
        yield c


@settings(
    max_examples=int(os.environ.get("PMSERVE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(req=hostile())
def test_hostile_requests_get_a_4xx_or_a_correct_answer(app_client, req: Req):
    r = app_client.request(req.method, req.path, content=req.body, headers=req.headers)
    assert verdict(req, r.status_code, r.headers, r.content) is None, (
        req.kind,
        req.path,
        r.status_code,
        r.text[:300],
    )
    assert app_client.get("/v2/health/live").status_code == 200
