"""`edge2dexit serve` end to end: a real server (its own process, on a free loopback port, the default bundle and
model) and real HTTP and WebSocket clients. Every endpoint, every error the service promises, the API key, CORS,
the bounded queue and streams, clients that go away, and SIGTERM under load."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from edge2dexit.measure.serve import running_service

from helpers import REVIEW, REVIEWS, assert_same_decision, loaded_after

pytestmark = pytest.mark.llama

KEY = "s3cret key/with+odd=chars"
APP_ORIGIN = "http://localhost:3000"
WIDTH, STREAMS, QUEUE, MAX_BODY = 2, 2, 4, 1 << 16
LONG = " ".join([REVIEW] * 6)  # ~490 tokens: nearly the whole context of 512
POSITIVE = ("I loved this film, it was wonderful and moving. The acting was superb. Great fun from start to end. "
            "The music was lovely and the story was brilliant. A masterpiece, I will watch it again. Everyone should "
            "see it. The cast was excellent. Best movie of the year.")


@pytest.fixture(scope="module")
def service():
    # --no-lexical: the default bundle's words would answer every text here before llama.cpp, and these tests are of
    # reads through the shared engine (the words' answers: test_the_words_answer_before_the_service_reads)
    with running_service("--no-lexical", "--n-ctx", "512", "--width", str(WIDTH), "--streams", str(STREAMS),
                         "--queue", str(QUEUE), "--max-body", str(MAX_BODY), "--api-key", KEY,
                         "--cors-origin", APP_ORIGIN) as running:
        yield running


@pytest.fixture()
def http(service):
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


def ws_url(service, query: str = "") -> str:
    return service.url.replace("http://", "ws://") + "v1/stream" + query


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("metrics").text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE).group(1))


def as_row(result: dict) -> dict:
    """A Result as JSON, with its scores as the score_<label> columns that `assert_same_decision` reads."""
    return {**result, **{f"score_{label}": score for label, score in result["scores"].items()}}


def wait_until(condition, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- endpoints -------------------------------------------------------------------------------------------------


def test_health_bundle_and_page(service, http):
    assert httpx.get(service.url + "health").json() == {"status": "ok"}  # open without the key
    bundle = http.get("v1/bundle").json()
    assert bundle["labels"] == ["negative", "positive"] and bundle["default_policy"] == "prefix-mean"
    assert set(bundle["policies"]) >= {"full", "prefix-mean", "paper2d"}
    assert bundle["base_model"]["name"] == "smollm2-135m@q8_0" and bundle["base_model"]["n_layer"] == 30
    assert bundle["card"].startswith("# edge2dexit bundle")
    assert bundle["service"] == {"width": WIDTH, "streams": STREAMS, "queue": QUEUE}
    page = httpx.get(service.url)  # the page and its files are open too
    assert page.status_code == 200 and "/static/page.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "new WebSocket" in httpx.get(service.url + "static/page.js").text


def test_classify_one_text_answers_its_result(http):
    result = http.post("v1/classify", json={"text": REVIEWS[1]}).json()
    assert result["label"] == "negative" and set(result["scores"]) == {"negative", "positive"}
    for field in ("exit_sentence", "exit_layer", "sentences_read", "token_layers", "tokens", "seconds", "early"):
        assert field in result
    assert http.post("v1/classify", json={"text": REVIEWS[0], "policy": "full"}).json()["exit_layer"] == 29


def test_the_words_answer_before_the_service_reads():
    with running_service("--n-ctx", "512", "--width", "1") as service:
        result = httpx.post(service.url + "v1/classify", json={"text": POSITIVE}, timeout=120).json()
    assert (result["label"], result["exit_layer"], result["token_layers"]) == ("positive", -1, 0)


def test_classify_a_list_answers_every_text_in_order(http):
    outcomes = http.post("v1/classify", json={"texts": [REVIEWS[0], " ", REVIEWS[1]]}).json()
    assert [o.get("label") for o in outcomes] == ["positive", None, "negative"]
    assert outcomes[1] == {"error": "the text is empty", "kind": "InputError", "exit_code": 3}


def test_predict_answers_in_the_text_embeddings_inference_shape(http):
    one = http.post("predict", json={"inputs": REVIEWS[0]}).json()
    assert [p["label"] for p in one] == ["positive", "negative"] and sum(p["score"] for p in one) == pytest.approx(1)
    many = http.post("predict", json={"inputs": [REVIEWS[0], REVIEWS[1]]}).json()
    assert [answer[0]["label"] for answer in many] == ["positive", "negative"]


def test_concurrent_clients_share_the_engine_and_decide_as_one_at_a_time(http):
    alone = [http.post("v1/classify", json={"text": text}).json() for text in REVIEWS[:4]]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda text: http.post("v1/classify", json={"text": text}).json(), REVIEWS[:4]))
    for got, want in zip(together, alone):
        assert_same_decision(as_row(got), as_row(want))


def test_metrics_count_requests_documents_errors_latency_and_the_queue(http):
    http.post("v1/classify", json={"text": ""})
    text = http.get("metrics").text
    for name in ("edge2dexit_requests_total{", "edge2dexit_request_seconds_bucket{", "edge2dexit_documents_total ",
                 'edge2dexit_errors_total{kind="InputError"}', "edge2dexit_early_exits_total ",
                 "edge2dexit_early_exit_ratio ", "edge2dexit_queue_waiting ", "edge2dexit_queue_in_flight ",
                 f"edge2dexit_queue_limit {QUEUE}.0", "edge2dexit_streams_open "):
        assert name in text, name


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, status, field, kind, exit_code", [
    ("v1/classify", b'{"text": "' + b"x" * MAX_BODY + b'"}', 413, "body", "RequestError", 2),
    ("v1/classify", b'{"text": "Great', 422, "body", "RequestError", 2),
    ("v1/classify", b"[" * 50_000, 422, "body", "RequestError", 2),
    ("v1/classify", b'["Great film."]', 422, "body", "RequestError", 2),
    ("v1/classify", b'{"text": 5}', 422, "text", "RequestError", 2),
    ("v1/classify", b'{"texts": ["Great film.", null]}', 422, "texts[1]", "RequestError", 2),
    ("v1/classify", b'{"texts": ["a", "b", "c", "d", "e"]}', 422, "texts", "RequestError", 2),
    ("v1/classify", b'{"txt": "Great film."}', 422, "txt", "RequestError", 2),
    ("v1/classify", b'{"text": "Great film.", "policy": "fastest"}', 422, "policy", "RequestError", 2),
    ("v1/classify", b'{"text": " \\n "}', 422, None, "InputError", 3),
    ("v1/classify", b'{"text": "bin\\u0000ary"}', 422, None, "InputError", 3),
    ("v1/classify", b'{"text": "lone \\ud800 surrogate"}', 422, None, "InputError", 3),
    ("v1/classify", json.dumps({"text": "word " * 700}).encode(), 422, None, "ContextOverflowError", 6),
    ("predict", b'{"inputs": ["Great film.", ""]}', 422, "inputs[1]", "InputError", 3),
    ("predict", b'{}', 422, "inputs", "RequestError", 2),
    ("predict", b'{"inputs": "Great film.", "raw_scores": true}', 422, "raw_scores", "RequestError", 2),
    ("predict", b'{"inputs": "Great film.", "parameters": {"top_k": 1}}', 422, "parameters", "RequestError", 2),
    ("predict", b'{"inputs": "Great film.", "truncate": "yes"}', 422, "truncate", "RequestError", 2),
    ("v1/classify", b'{"text": "Great film.", "max_error": "low"}', 422, "max_error", "RequestError", 2),
    ("v1/classify", b'{"text": "Great film.", "max_error": 0.0001}', 422, None, "SettingsError", 2),
])
def test_bad_requests_get_one_clear_error(http, path, body, status, field, kind, exit_code):
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["kind"] == kind and error["exit_code"] == exit_code and error.get("field") == field
    assert error["error"] and "Traceback" not in response.text


def test_every_http_error_has_the_one_error_body(service, http):
    """401, 404, 405, 413, 422 and a bad host: each one JSON object with error, kind and exit_code (503: below)."""
    def body(response, status, kind):
        assert response.status_code == status, response.text
        error = response.json()
        assert set(error) >= {"error", "kind", "exit_code"} and error["kind"] == kind and error["exit_code"] == 2
        return error

    body(http.get("nothing"), 404, "NotFound")
    body(http.get("v1/classify"), 405, "MethodNotAllowed")
    body(httpx.post(service.url + "v1/classify", json={"text": "Great film."}), 401, "Unauthorized")
    body(http.get("health", headers={"Host": "attacker.test"}), 400, "BadHost")
    body(http.post("v1/classify", content=b"x" * (MAX_BODY + 1)), 413, "RequestError")


def test_the_bearer_scheme_is_read_in_any_case(service):
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = httpx.post(service.url + "v1/classify", json={"text": "Great film."},
                              headers={"Authorization": f"{scheme} {KEY}"}, timeout=120)
        assert response.status_code == 200, scheme


def test_predict_reads_truncate_as_text_embeddings_inference_does(http):
    long = " ".join([REVIEW] * 12)  # beyond the context of 512
    assert http.post("predict", json={"inputs": long}).json()["kind"] == "ContextOverflowError"
    answer = http.post("predict", json={"inputs": long, "truncate": True}).json()
    assert answer[0]["label"] in ("positive", "negative")
    assert http.post("v1/classify", json={"text": long, "truncate": True}).json()["truncated"] is True


def test_a_request_may_ask_for_its_own_promise(http):
    """Per request, `max_error` and `coverage` as the library reads them: the answer says unsure or gives its set."""
    result = http.post("v1/classify", json={"text": REVIEWS[2], "coverage": 0.9}).json()
    assert result["prediction_set"] and result["label"] in result["prediction_set"]


# --- safety ----------------------------------------------------------------------------------------------------


def test_the_api_key_is_required_once_set(service):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(service.url + "v1/classify", json={"text": "Great film."}, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(service.url + "metrics").status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(service))
    assert refused.value.response.status_code == 401
    # a browser cannot set headers on a WebSocket: the key may come as a subprotocol
    token = base64.urlsafe_b64encode(KEY.encode()).decode().rstrip("=")
    with connect(ws_url(service), subprotocols=["edge2dexit", f"bearer.{token}"]) as ws:
        assert ws.subprotocol == "edge2dexit"


def test_cors_only_for_the_origins_named(service, http):
    allowed = http.get("v1/bundle", headers={"Origin": APP_ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "access-control-allow-origin" not in http.get("v1/bundle", headers={"Origin": "http://evil.test"}).headers
    preflight = httpx.options(service.url + "v1/classify", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    with pytest.raises(InvalidStatus) as refused:  # browsers do not apply CORS to WebSockets: the service does
        connect(ws_url(service), additional_headers={"Authorization": f"Bearer {KEY}", "Origin": "http://evil.test"})
    assert refused.value.response.status_code == 403


def test_only_loopback_host_names_are_served(service):
    """A name that resolves to 127.0.0.1 for a web page (DNS rebinding) is not this service's name."""
    response = httpx.get(service.url + "health", headers={"Host": "attacker.test"})
    assert response.status_code == 400


# --- streams ---------------------------------------------------------------------------------------------------


def test_a_stream_decides_the_moment_it_can(service, http):
    sentences = re.split(r"(?<=\.) ", POSITIVE)
    with connect(ws_url(service), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        decided_at = None
        for k, sentence in enumerate(sentences):
            ws.send(json.dumps({"text": sentence + " "}))
            report = json.loads(ws.recv())
            if report["result"] is not None and decided_at is None:
                decided_at = k
        ws.send(json.dumps({"finish": True}))
        report = json.loads(ws.recv())
    result = report["result"]
    assert decided_at is not None and decided_at < len(sentences) - 1, "decided before the text ended"
    assert result["label"] == "positive" and result["early"] and result["sentences_total"] is None
    marks = [s["read"] for s in report["sentences"]]
    assert len(marks) == len(sentences) and marks == [True] * result["sentences_read"] + [False] * (
        len(sentences) - result["sentences_read"])
    assert all(s["layers"] == result["exit_layer"] + 1 for s in report["sentences"] if s["read"])
    assert 0 < report["token_layers"] < report["full_token_layers"]


def test_a_stream_fed_the_whole_text_decides_as_classify(service, http):
    want = http.post("v1/classify", json={"text": REVIEW}).json()
    with connect(ws_url(service), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        ws.send(json.dumps({"text": REVIEW}))
        ws.recv()
        ws.send(json.dumps({"finish": True}))
        assert_same_decision(as_row(json.loads(ws.recv())["result"]), as_row(want))


def test_a_binary_frame_and_an_unknown_query_parameter_are_refused_in_words(service):
    auth = {"Authorization": f"Bearer {KEY}"}
    with connect(ws_url(service), additional_headers=auth) as ws:
        ws.send(b'{"text": "Great film."}')  # a binary frame
        reply = json.loads(ws.recv())
        assert reply["kind"] == "RequestError" and "binary" in reply["error"] and reply["exit_code"] == 2
        ws.send(json.dumps({"text": "Great fun from start to end. "}))  # and the stream goes on
        assert "sentences" in json.loads(ws.recv())
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(service, "?policy=prefix-mean&speed=max"), additional_headers=auth)
    assert refused.value.response.status_code == 422 and b"speed" in refused.value.response.body


def test_a_stream_longer_than_the_context_decides_on_what_fits_and_says_so(service):
    """180 short sentences into a context of 512 (`full`, which decides only at the end): once one does not fit, the
    stream decides on what it read, and its finish reports that, never 'nothing arrived'."""
    with connect(ws_url(service, "?policy=full"), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for k in range(180):
            ws.send(json.dumps({"text": f"The film runs {k} minutes. "}))
            report = json.loads(ws.recv())
            assert "error" not in report, report
        ws.send(json.dumps({"finish": True}))
        result = json.loads(ws.recv())["result"]
    assert result["truncated"] and result["sentences_read"] == result["sentences_total"] > 10


def test_stream_errors_are_replies_and_the_stream_goes_on(service):
    with connect(ws_url(service, "?policy=sentence-vote"), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for message, kind in (("not json", "RequestError"), (json.dumps({"finish": 1}), "RequestError"),
                              (json.dumps({"text": "bin\x00ary"}), "InputError"),
                              (json.dumps({"finish": True}), "InputError")):  # nothing arrived
            ws.send(message)
            assert json.loads(ws.recv())["kind"] == kind
        ws.send(json.dumps({"text": "Boring. I fell asleep halfway through."}))
        ws.recv()
        ws.send(json.dumps({"finish": True}))
        assert json.loads(ws.recv())["result"]["policy"] == "sentence-vote"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(service, "?policy=fastest"), additional_headers={"Authorization": f"Bearer {KEY}"})
    assert refused.value.response.status_code == 422


def test_streams_are_bounded_and_a_client_that_drops_frees_its_sequence(service, http):
    auth = {"Authorization": f"Bearer {KEY}"}
    with connect(ws_url(service), additional_headers=auth) as first, \
            connect(ws_url(service), additional_headers=auth):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(service), additional_headers=auth)
        assert refused.value.response.status_code == 503 and refused.value.response.headers["Retry-After"] == "1"
        first.send(json.dumps({"text": "A wonderful film. "}))
        first.recv()
        first.socket.shutdown(socket.SHUT_RDWR)  # gone without a word
    wait_until(lambda: metric(http, "edge2dexit_streams_open") == 0)
    with connect(ws_url(service), additional_headers=auth) as ws:
        ws.send(json.dumps({"text": "Great fun from start to end. The music was lovely."}))
        ws.send(json.dumps({"finish": True}))
        ws.recv()
        assert json.loads(ws.recv())["result"]["label"] == "positive"


# --- load ------------------------------------------------------------------------------------------------------


def test_a_full_queue_answers_503_and_a_client_that_leaves_frees_its_texts(service, http):
    """Four slow texts fill the queue; one more is refused at once. Their client leaves: the two waiting are dropped
    and the two in flight stop after their current decode, long before they would have ended."""
    cancelled = metric(http, "edge2dexit_cancelled_total")
    body = json.dumps({"texts": [LONG] * QUEUE, "policy": "paper2d"}).encode()
    host, port = httpx.URL(service.url).host, httpx.URL(service.url).port
    with socket.create_connection((host, port)) as leaving:
        leaving.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: metric(http, "edge2dexit_queue_waiting") + metric(http, "edge2dexit_queue_in_flight")
                   == QUEUE)
        refused = http.post("v1/classify", json={"text": "Great film."})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["kind"] == "Overloaded"
    wait_until(lambda: metric(http, "edge2dexit_queue_waiting") + metric(http, "edge2dexit_queue_in_flight") == 0,
               limit=10)  # paper2d over the four takes 10-60 s here
    assert metric(http, "edge2dexit_cancelled_total") == cancelled + 1
    assert http.post("v1/classify", json={"text": "Great film."}).status_code == 200


def test_sigterm_under_load_answers_or_refuses_every_request():
    with running_service("--no-lexical", "--n-ctx", "512", "--width", "1", "--queue", "16") as service, \
            httpx.Client(base_url=service.url, timeout=120) as http, connect(ws_url(service)) as stream:
        results: list = []

        def send(_):
            try:
                response = http.post("v1/classify", json={"text": LONG})
                results.append((response.status_code, response.json()))
            except httpx.HTTPError as exc:  # would be a request left without an answer
                results.append((type(exc).__name__, None))

        with ThreadPoolExecutor(6) as pool:
            pending = pool.map(send, range(6))
            wait_until(lambda: metric(http, "edge2dexit_queue_waiting") >= 3)
            service.process.send_signal(signal.SIGTERM)
            list(pending)
        assert service.process.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(Exception):
            stream.recv(timeout=5)
        assert stream.close_code == 1012
        assert "never retrieved" not in service.log.read_text(errors="replace")
    statuses = sorted(status for status, _ in results)
    assert set(statuses) == {200, 503} and len(statuses) == 6, results  # finished in flight, refused the rest
    assert all(body["kind"] == "ShuttingDown" and body["exit_code"] == 75 for status, body in results
               if status == 503)


def test_sigterm_during_a_list_answers_each_text_read_and_refuses_the_rest_in_place():
    with running_service("--no-lexical", "--n-ctx", "512", "--width", "1", "--queue", "16") as service, \
            httpx.Client(base_url=service.url, timeout=120) as http:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "v1/classify", json={"texts": [LONG] * 6})
            wait_until(lambda: metric(http, "edge2dexit_queue_waiting") >= 3)
            service.process.send_signal(signal.SIGTERM)
            response = pending.result()
        service.process.wait(60)
    assert response.status_code == 200, response.text
    outcomes = response.json()
    assert len(outcomes) == 6 and "label" in outcomes[0]
    refused = [o for o in outcomes if "error" in o]
    assert refused and all(o["kind"] == "ShuttingDown" and o["exit_code"] == 75 for o in refused)


def test_serve_and_its_help_load_no_model_and_no_server_stack_until_they_run():
    loaded = loaded_after([
        "from edge2dexit.cli import main",
        "for argv in (['serve', '--help'], ['bench', 'serve', '--help']):",
        "    sys.argv = ['edge2dexit', *argv]",
        "    try:\n        main()\n    except SystemExit as exit:\n        assert exit.code in (0, None), exit.code",
    ], ("llama_cpp", "starlette", "uvicorn", "httpx"))
    assert loaded == set()


@pytest.mark.slow
def test_the_load_test_compares_the_service_with_classify_many():
    from typer.testing import CliRunner

    from edge2dexit.cli import app

    res = CliRunner().invoke(app, ["bench", "serve", "--docs", "4", "--rounds", "1", "--clients", "1,2",
                                   "--n-ctx", "512"])
    assert res.exit_code == 0, res.output
    assert "aim at 2 clients" in res.stdout and res.stdout.count("\n") >= 5
