"""`sdft serve` on a tiny learner (tests/toy.py's copying model): the official `openai` client and raw HTTP
against a real uvicorn server on loopback, while rounds train in their own processes."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from openai import APIStatusError, AuthenticationError, OpenAI
from test_learner import task_records

from selfdistill.learner import Learner
from selfdistill.serve import ServeSettings, create_app
from selfdistill.serve.host import wait_for

KEY = "secret-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `create_app` in a thread of this process, on a free loopback port."""

    def __init__(self, workdir, **settings):
        self.app = create_app(workdir, ServeSettings(api_key=KEY, max_new_tokens=8, **settings))
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        assert wait_for(lambda: self.server.started, 30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        runner = self.app.state.runner
        if runner.process is not None:
            runner.process.wait(300)


def _records(learner_dir) -> int:
    with Learner(learner_dir, echo=lambda _: None).db.transaction() as session:
        from sqlalchemy import func, select

        from selfdistill.learner import database as db

        return session.scalar(select(func.count()).select_from(db.Record))


def test_chat_streaming_corrections_and_a_promoted_round_while_serving(learner_dir):
    with Server(learner_dir) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
        assert [m.id for m in client.models.list().data] == ["learner"]

        # Plain and streamed chat give the same greedy answer, from version 0.
        messages = [{"role": "user", "content": "k1 k2"}]
        plain = client.chat.completions.create(model="learner", messages=messages, max_tokens=3)
        assert plain.id.startswith("chatcmpl-") and plain.system_fingerprint == "v0"
        streamed = client.chat.completions.create(model="learner", messages=messages, max_tokens=3, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
        assert "".join(pieces) == plain.choices[0].message.content and len(pieces) >= 2
        text = client.completions.create(model="learner", prompt="k1", max_tokens=2)
        assert text.choices[0].finish_reason in ("stop", "length")

        # A correction by completion id stores a demonstration with exactly the prompt the model saw.
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        added = http.post("/v1/demonstrations", json={"completion_id": plain.id, "demonstration": "v3"}).json()
        assert added["added"] == 1
        learner = Learner(learner_dir, echo=lambda _: None)
        with learner.db.transaction() as session:
            from sqlalchemy import select

            from selfdistill.learner import database as db

            stored = session.scalars(select(db.Record)).one().data
        assert stored == {"prompt": messages, "demonstration": "v3", "completion_id": plain.id}

        # Many demonstrations over HTTP, then a round started over HTTP trains in its own process while the
        # server keeps answering; the promoted version answers from the next request on.
        rows = [{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in task_records("v3", 0)]
        assert http.post("/v1/demonstrations", json={"records": rows, "task": "alpha"}).status_code == 200
        started = http.post("/v1/rounds", json={})
        assert started.status_code == 202, started.text
        number = started.json()["number"]
        assert http.post("/v1/rounds", json={}).status_code == 409  # one at a time
        served = []
        while server.app.state.runner.running():
            reply = client.chat.completions.create(model="learner", messages=messages, max_tokens=3)
            served.append(reply.system_fingerprint)
        # Answered all along the round: by version 0, then by version 1 as soon as it was promoted (the round's
        # process still writes its report after that).
        assert served[0] == "v0" and served == sorted(served)
        round_ = http.get(f"/v1/rounds/{number}").json()
        assert round_["outcome"] == "promoted" and round_["training"] and round_["training"][-1]["step"] == 12
        assert wait_for(lambda: server.app.state.host.served.version == 1, 60)
        after = client.chat.completions.create(model="learner", messages=messages, max_tokens=3)
        assert after.system_fingerprint == "v1" and after.choices[0].message.content.strip() == "v3"
        versions = http.get("/v1/versions").json()
        assert versions["current_version"] == versions["served_version"] == 1


def test_a_rejected_round_changes_nothing_served_and_bad_requests_store_nothing(learner_dir):
    learner = Learner(learner_dir, echo=lambda _: None)
    learner.add(task_records("v3", 0), "alpha")
    assert learner.round().outcome == "promoted"
    with Server(learner_dir) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert server.app.state.host.served.version == 1
        before = _records(learner_dir)

        # Without the key, with a wrong key: 401, nothing stored.
        row = {"prompt": "k1 k2", "demonstration": "v5"}
        assert http.post("/v1/demonstrations", json=row).status_code == 401
        assert http.post("/v1/demonstrations", json=row, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.post("/v1/rounds", json={}).status_code == 401
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=server.url + "/v1", api_key="nope").post(
                "/demonstrations", body=row, cast_to=httpx.Response
            )
        # Malformed JSON, a record without a demonstration, an unknown completion, too many records, too large
        # a body: 4xx naming what is wrong, nothing stored.
        bad = http.post(
            "/v1/demonstrations", content=b"{not json", headers={**auth, "content-type": "application/json"}
        )
        assert bad.status_code == 400 and "error" in bad.json()
        missing = http.post("/v1/demonstrations", json={"records": [row, {"prompt": "k1"}]}, headers=auth)
        assert missing.status_code == 400 and "records.1.demonstration" in missing.json()["error"]["message"]
        unknown = http.post(
            "/v1/demonstrations", json={"completion_id": "chatcmpl-x", "demonstration": "v1"}, headers=auth
        )
        assert unknown.status_code == 404 and "completion_id" in unknown.json()["error"]["message"]
        many = http.post("/v1/demonstrations", json={"records": [row] * 1001}, headers=auth)
        assert many.status_code == 413
        huge = http.post("/v1/demonstrations", json={"prompt": "k1" * 600_000, "demonstration": "v1"}, headers=auth)
        assert huge.status_code == 413
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert http.post("/v1/chat/completions", json={"model": "other", "messages": [row]}).status_code in (400, 404)
        assert _records(learner_dir) == before

        # A round that forgets alpha (beta answers v5 to every prompt) is rejected: v1 stays served.
        rows = [{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in task_records("v5", 1)]
        assert http.post("/v1/demonstrations", json={"records": rows, "task": "beta"}, headers=auth).status_code == 200
        number = http.post("/v1/rounds", json={}, headers=auth).json()["number"]
        assert wait_for(lambda: not server.app.state.runner.running(), 300)
        decided = http.get(f"/v1/rounds/{number}").json()
        assert decided["outcome"] == "rejected" and "task alpha: score drop" in decided["decision"]["summary"]
        time.sleep(1.5)  # past the host's poll
        assert server.app.state.host.served.version == 1 and server.app.state.host.swaps == 0
        status = http.get("/v1/status").json()
        assert status["served_version"] == 1 and status["pending"] == 18 and json.dumps(status)


def test_errors_have_openai_shape(learner_dir):
    with Server(learner_dir) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
        with pytest.raises(APIStatusError) as caught:
            client.chat.completions.create(
                model="learner", messages=[{"role": "user", "content": "k1"}], max_tokens=9999
            )
        assert caught.value.status_code == 400 and "max_tokens" in caught.value.message


def test_the_readme_client_example_runs_against_the_server(learner_dir, capsys):
    """The README's `openai` client example, pointed at this server: a chat, a stream, a correction."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serve while learning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    with Server(learner_dir) as server:
        code = code.replace("http://127.0.0.1:8000", server.url).replace("secret", KEY)
        code = (
            code.replace('"assistant"', '"learner"')
            .replace("max_tokens=32", "max_tokens=4")
            .replace("max_tokens=16", "max_tokens=4")
        )
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("v0 ")
    assert _records(learner_dir) == 1


def test_rounds_start_on_their_own_by_count_and_by_schedule(learner_dir):
    rows = [{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in task_records("v3", 0)]
    auth = {"Authorization": f"Bearer {KEY}"}
    with Server(learner_dir, round_every=10) as server:
        http = httpx.Client(base_url=server.url, headers=auth, timeout=60)
        assert (
            http.post("/v1/demonstrations", json={"records": rows[:4], "task": "alpha"}).json()["round_started"] is None
        )
        assert http.post("/v1/demonstrations", json={"records": rows[4:], "task": "alpha"}).json()["round_started"] == 1
        assert wait_for(lambda: not server.app.state.runner.running(), 300)
    more = [{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in task_records("v3", 5)]
    with Server(learner_dir, round_interval=0.5) as server:
        http = httpx.Client(base_url=server.url, headers=auth, timeout=60)
        http.post("/v1/demonstrations", json={"records": more, "task": "alpha"})
        assert wait_for(lambda: len(Learner(learner_dir, echo=lambda _: None).status()["rounds"]) == 2, 60)
        assert wait_for(lambda: not server.app.state.runner.running(), 300)
