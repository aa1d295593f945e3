"""The LLM-as-judge grader against a small local OpenAI-compatible fake server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from selfdistill.errors import UserError
from selfdistill.eval.graders import get


class FakeJudge(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][-1]["content"]
        answer = prompt.split("Answer to grade:\n", 1)[1].split("\n", 1)[0]
        verdict = {"right": "CORRECT", "half": "Verdict: PARTIALLY_CORRECT", "wrong": "INCORRECT"}.get(
            answer, "no idea"
        )
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    FakeJudge.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_judge_verdicts_map_to_scores(server, monkeypatch):
    monkeypatch.setenv("SDFT_JUDGE_BASE_URL", server)
    monkeypatch.setenv("SDFT_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("SDFT_JUDGE_API_KEY", "secret")
    grade = get("judge")
    record = {"prompt": [{"role": "user", "content": "Who won?"}], "answer": "Ana"}
    assert grade("right", record) == 1.0
    assert grade("half", record) == 0.5
    assert grade("wrong", record) == 0.0
    assert grade("gibberish", record) == 0.0  # an unparsable verdict is not credit
    first = FakeJudge.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer secret"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0
    assert "Who won?" in first["body"]["messages"][0]["content"] and "Ana" in first["body"]["messages"][0]["content"]


def test_judge_options_and_errors(server, monkeypatch):
    monkeypatch.delenv("SDFT_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(UserError, match="SDFT_JUDGE_BASE_URL"):
        get("judge")
    grade = get("judge", base_url=server, model="m", partial_credit=0.25)
    assert grade("half", {"prompt": "q", "answer": "a"}) == 0.25
    dead = get("judge", base_url="http://127.0.0.1:9/v1", model="m", timeout=2)
    with pytest.raises(UserError, match="Judge endpoint"):
        dead("right", {"prompt": "q", "answer": "a"})
