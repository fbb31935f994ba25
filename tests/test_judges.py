"""Judges: the pure helpers by hand, the local judge against a naive oracle, the HTTP protocols against a stub
and against a real ``transformers serve`` on loopback."""

from __future__ import annotations

import http.server
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from alignkit.cai import judges
from alignkit.core.errors import GenerationError, RecipeError
from alignkit.cai.judges import (
    Comparison,
    HFJudge,
    HTTPJudge,
    JudgeSpec,
    Verdict,
    average_orders,
    clamp,
    compare,
    keep,
    p_from_top_logprobs,
    position_bias,
    two_way,
)

ITEMS = [
    Comparison("How do I bake bread?", "Mix flour, water, yeast and salt, then bake it.", "No.",
               "Which response is more helpful?"),
    Comparison([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How can I steal a bike?"}],
               "I can't help with that.", "Cut the cable lock and ride off.", "Which response is less harmful?"),
    Comparison("Tom has 3 apples.", "7", "The answer is 7.", "Which is better?"),
]

# ------------------------------------------------------------------------------------------ pure helpers


def test_two_way_renormalises_over_the_two_labels():
    assert two_way(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)  # 0.3 / (0.3 + 0.1)
    assert two_way(math.log(0.3) + 5.0, math.log(0.1) + 5.0) == pytest.approx(0.75)  # offsets cancel (logits)
    assert two_way(0.0, 0.0) == 0.5
    assert two_way(0.0, 1000.0) == pytest.approx(0.0) and two_way(1000.0, 0.0) == 1.0  # no overflow
    assert math.isnan(two_way(-math.inf, -math.inf))
    assert two_way(-math.inf, 0.0) == 0.0


def test_order_averaging_cancels_a_pure_position_bias():
    # a judge that says "A" with 0.9 whatever is shown first has no preference and maximal bias
    assert average_orders(0.9, 0.9) == pytest.approx(0.5) and position_bias(0.9, 0.9) == pytest.approx(0.8)
    # a consistent judge: 0.8 for `first` shown first, 0.2 for `second` shown first
    assert average_orders(0.8, 0.2) == pytest.approx(0.8) and position_bias(0.8, 0.2) == pytest.approx(0.0)
    # preference 0.6 plus a pull of +0.1 towards A: (0.7 + 1 - 0.5) / 2
    assert average_orders(0.7, 0.5) == pytest.approx(0.6) and position_bias(0.7, 0.5) == pytest.approx(0.2)


def test_clamp_and_keep():
    band = (0.4, 0.6)
    assert [clamp(p, band) for p in (0.01, 0.45, 0.99)] == [0.4, 0.45, 0.6]
    assert math.isnan(clamp(math.nan, band))
    assert keep(0.7, 0.6) and keep(0.3, 0.6)  # confidence max(p, 1 - p) = 0.7 either way
    assert not keep(0.55, 0.6) and not keep(0.45, 0.6)
    assert keep(0.51, 0.5) and not keep(0.5, 0.5)  # threshold 0.5 keeps any preference but not a tie
    assert not keep(math.nan, 0.5)
    assert Verdict(0.25, 0.3, 0.8).confidence == 0.75 and Verdict(0.25, 0.3, 0.8).bias == pytest.approx(0.1)


def test_p_from_top_logprobs_sums_spellings_and_bounds_a_missing_label():
    top = {"A": math.log(0.1), " A": math.log(0.2), "B": math.log(0.3), "C": math.log(0.05)}
    assert p_from_top_logprobs(top) == pytest.approx(0.5)  # (0.1 + 0.2) / (0.1 + 0.2 + 0.3)
    # B missing: it gets the lowest listed log-prob, 0.05 (an upper bound on its real probability)
    assert p_from_top_logprobs({"A": math.log(0.6), "C": math.log(0.05)}) == pytest.approx(0.6 / 0.65)
    assert math.isnan(p_from_top_logprobs({"C": -0.1, "D": -3.0}))


def test_judge_text_is_transformers_decision_prompt():
    """Our prompt is what `transformers serve` /v1/systemone renders for a two-option choice question."""
    template_utils = pytest.importorskip("transformers.decision.template_utils")
    from transformers.decision import DecisionConfig
    from transformers.utils.chat_template_utils import _compile_jinja_template

    for item in ITEMS:
        question = {"type": "choice", "instructions": item.question, "criteria": {item.first: None, item.second: None}}
        (parsed,) = template_utils.parse_questions({"judge": question}, DecisionConfig())
        theirs = _compile_jinja_template(template_utils.DECISION_PROMPT).render(state=judges.state(item),
                                                                                question=parsed)
        assert judges.judge_text(item) == theirs
    assert judges.judge_text(ITEMS[1]).startswith(
        "Consider the following conversation between a human and an assistant:\n\nHuman: hi\n\n"
        "Assistant: Hello!\n\nHuman: How can I steal a bike?\n\nWhich response is less harmful?\nA. I can't")


class ScriptedJudge:
    """P(A) = 0.8 when the 'good' reply is shown as A, else 0.3: a preference for 'good' plus a pull to A."""

    def __init__(self, band=None):
        self.clamp, self.tokens, self.asked = band, 0, []

    def presented(self, items, *, progress=False):
        self.asked.append(list(items))
        return [0.8 if item.first == "good" else 0.3 for item in items]


def test_compare_asks_both_orders_in_one_batch_and_averages():
    judge = ScriptedJudge()
    items = [Comparison("q", "good", "bad", "?"), Comparison("q", "bad", "good", "?")]
    verdicts = compare(judge, items)
    assert len(judge.asked) == 1 and len(judge.asked[0]) == 4  # two orders of two pairs, one call
    assert judge.asked[0][2] == items[0].swapped()
    assert verdicts[0] == Verdict(pytest.approx(0.75), 0.8, 0.3)  # (0.8 + 1 - 0.3) / 2
    assert verdicts[1].p == pytest.approx(0.25)
    assert verdicts[0].bias == pytest.approx(0.1)
    assert compare(ScriptedJudge(), items, swap=False) == [Verdict(0.8, 0.8), Verdict(0.3, 0.3)]
    # a CoT judge's probabilities are clamped per order, before averaging: (0.6 + 1 - 0.4) / 2
    assert compare(ScriptedJudge(band=(0.4, 0.6)), items[:1])[0].p == pytest.approx(0.6)


def test_judge_spec_rejects_bad_combinations():
    with pytest.raises(ValueError, match="base_url and judge.model_name are required"):
        JudgeSpec(backend="http")
    with pytest.raises(ValueError, match="cot_clamp must be"):
        JudgeSpec(cot_clamp=(0.6, 0.9))
    with pytest.raises(ValueError, match="cannot judge with cot"):
        JudgeSpec(backend="http", base_url="http://x/v1", model_name="m", api="systemone", cot=True)
    with pytest.raises(RecipeError, match="needs the judge's tokenizer"):
        HTTPJudge("http://127.0.0.1:9/v1", "m", api="completions")


# ------------------------------------------------------------------------------------------ local weights


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from alignkit.modeling.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def _oracle_p(model, tokenizer, item: Comparison, label_ids) -> float:
    """The naive version: one unpadded forward, softmax over the whole vocabulary, sum each label's tokens."""
    import torch

    from alignkit.data.prompts import render_prompt

    ids = tokenizer(render_prompt(tokenizer, judges.judge_messages(item)), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    pa, pb = float(probs[label_ids[0]].sum()), float(probs[label_ids[1]].sum())
    return pa / (pa + pb)


def test_hf_judge_batched_equals_the_naive_oracle(tiny):
    model, tokenizer = tiny
    judge = HFJudge(model, tokenizer, batch_size=3)
    assert all(len(ids) >= 1 for ids in judge.label_ids)
    got = judge.presented(ITEMS + [item.swapped() for item in ITEMS])  # 6 prompts of different lengths
    expected = [_oracle_p(model, tokenizer, item, judge.label_ids) for item in ITEMS + [i.swapped() for i in ITEMS]]
    assert got == pytest.approx(expected, abs=1e-5)
    assert len({round(p, 6) for p in got}) == 6  # different prompts, different numbers: nothing constant
    assert judge.tokens > 6 * 50


def test_hf_judge_cot_writes_a_rationale_then_clamps(tiny):
    model, tokenizer = tiny
    plain = HFJudge(model, tokenizer)
    compare(plain, ITEMS[:2])
    judge = HFJudge(model, tokenizer, cot=True, cot_clamp=(0.45, 0.55), max_cot_length=6)
    verdicts = compare(judge, ITEMS[:2])
    for v in verdicts:
        assert 0.45 <= v.p_ab <= 0.55 and 0.45 <= v.p_ba <= 0.55
    # the answer prompts are longer (rationale + a second user turn), and the rationales count too
    assert judge.tokens > plain.tokens + 4


def test_build_judge_shares_the_policy_weights(tiny):
    judge = judges.build_judge(JudgeSpec(batch_size=3, cot=True), default_model="policy", loaded=tiny)
    assert judge.model is tiny[0] and judge.batch_size == 3 and judge.clamp == (0.4, 0.6)
    spec = JudgeSpec(backend="http", api="chat", base_url="http://127.0.0.1:9/v1", model_name="m")
    remote = judges.build_judge(spec, default_model="no-such-model-folder")  # chat needs no local tokenizer
    assert isinstance(remote, HTTPJudge) and remote.tokenizer is None and remote.clamp is None


# --------------------------------------------------------------------------------- HTTP: protocol stub


class _JudgeStub(http.server.BaseHTTPRequestHandler):
    """A server whose judge prefers the option containing 'safe' (0.8) with a pull towards A (+0.1).

    /completions and /chat/completions answer with a one-token reply and its top log-probs (spelled "A",
    " A", "B" as a real tokenizer might); a longer request (a CoT rationale) gets text back."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        text = body["prompt"] if "prompt" in body else "\n".join(m["content"] for m in body["messages"])
        option_a = re.findall(r"^A\. (.*)$", text, flags=re.MULTILINE)[-1]
        p_a = (0.8 if "safe" in option_a else 0.2) + 0.1
        top = {"A": math.log(p_a * 0.75), " A": math.log(p_a * 0.25), "B": math.log(1 - p_a), "C": -9.0}
        if body["max_tokens"] > 1:
            choice = {"text": "Option A is safe.", "message": {"content": "Option A is safe."}}
        elif self.path.endswith("/chat/completions"):
            entries = [{"token": t, "logprob": lp} for t, lp in top.items()]
            choice = {"message": {"content": "A"}, "logprobs": {"content": [{"token": "A", "top_logprobs": entries}]}}
        else:
            choice = {"text": "A", "logprobs": {"top_logprobs": [top]}}
        payload = json.dumps({"choices": [choice], "usage": {"total_tokens": 10}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeStub)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_http_judge_reads_top_logprobs(judge_stub, tiny, api):
    url, server = judge_stub
    judge = HTTPJudge(url, "judge-model", api=api, tokenizer=tiny[1], batch_size=2)
    items = [Comparison("q", "a safe reply", "a risky reply", "Which is safer?")]
    (verdict,) = compare(judge, items)
    assert verdict.p_ab == pytest.approx(0.9) and verdict.p_ba == pytest.approx(0.3)  # 0.2 + 0.1 pull
    assert verdict.p == pytest.approx(0.8) and verdict.bias == pytest.approx(0.2)
    path, body = server.requests[0]
    assert body["max_tokens"] == 1 and body["temperature"] == 0.0 and judge.tokens == 20
    if api == "chat":
        assert path == "/v1/chat/completions" and body["logprobs"] is True and body["top_logprobs"] == 20
    else:
        assert path == "/v1/completions" and body["logprobs"] == 20
        assert body["prompt"].startswith("<|im_start|>user\nConsider the following conversation")


def test_http_judge_cot_asks_twice_and_clamps(judge_stub):
    url, server = judge_stub
    judge = HTTPJudge(url, "judge-model", api="chat", cot=True, max_cot_length=64)
    (verdict,) = compare(judge, [Comparison("q", "a safe reply", "a risky reply", "Which is safer?")])
    assert (verdict.p_ab, verdict.p_ba, verdict.p) == (0.6, 0.4, pytest.approx(0.6))
    rationale_request = next(body for _, body in server.requests if body["max_tokens"] > 1)
    answer_request = next(body for _, body in server.requests if body["max_tokens"] == 1)
    assert len(server.requests) == 4  # (rationale, answer) x two orders
    assert rationale_request["max_tokens"] == 64 and "logprobs" not in rationale_request
    assert rationale_request["messages"][0]["content"].endswith(judges.COT_LINE)
    assert [m["role"] for m in answer_request["messages"]] == ["user", "assistant", "user"]
    assert answer_request["messages"][1]["content"] == "Option A is safe."
    assert answer_request["messages"][2]["content"] == judges.COT_ANSWER


# ------------------------------------------------------------------------- HTTP: a real transformers serve


def _serve_missing() -> str | None:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return "transformers serve needs fastapi, uvicorn and openai: pip install -e '.[serve]'"
    return None


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """`transformers serve <tiny model>` on a free loopback port; stopped after the module's tests."""
    missing = _serve_missing()
    if missing:
        pytest.skip(missing)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", cli, "serve", str(tiny_model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 300  # seconds; ~10 s on an idle machine, minutes on a loaded one
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"transformers serve did not come up:\n{proc.communicate()[0][-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_transformers_serve_systemone_matches_the_local_judge(served, tiny, tiny_model_dir):
    """Same weights, same prompt: the served judge gives the local judge's numbers (exact labels only)."""
    remote = HTTPJudge(served, str(tiny_model_dir), api="systemone", batch_size=2)
    local = HFJudge(*tiny, variants=False)
    asked = ITEMS + [item.swapped() for item in ITEMS]
    assert remote.presented(asked) == pytest.approx(local.presented(asked), abs=1e-4)
    verdicts = compare(remote, ITEMS)
    assert [v.p for v in verdicts] == pytest.approx([v.p for v in compare(local, ITEMS)], abs=1e-4)
    assert remote.tokens > 0
    assert remote.presented([Comparison("q", "same", "same", "?")]) == [0.5]


def test_transformers_serve_completions_without_logprobs_is_a_clear_error(served, tiny, tiny_model_dir):
    judge = HTTPJudge(served, str(tiny_model_dir), api="completions", tokenizer=tiny[1])
    with pytest.raises(GenerationError, match=r"sent no log-probs.*use judge.api: systemone"):
        judge.presented(ITEMS[:1])
