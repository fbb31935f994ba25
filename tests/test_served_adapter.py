"""ppo sampling from a served base model that loads each step's LoRA adapter (vLLM's runtime LoRA contract),
against a stub server in this process that does what vLLM does: load the adapter folder it is given onto the
base weights, sample from base + adapter, unload on request. The real vLLM server: tests/test_vllm_server.py."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from alignkit.core.errors import RecipeError
from alignkit.generation.spec import generation_spec
from test_stage_ppo import run_stage


class LoRAServer(http.server.ThreadingHTTPServer):
    """/v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/completions over a base model folder. Like vLLM, it
    reads an adapter when asked to load it (a copy in ``store``), so later changes to the folder do not matter."""

    def __init__(self, base: Path, store: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base)
        self.store = store
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}  # name -> its LoRA tensors, as read at load
        self.log: list[tuple[str, str]] = []  # (endpoint, lora_name or model)
        self.b_norms: list[float] = []  # |lora_B| summed, per load: LoRA's B starts at zero
        self.lock = threading.Lock()
        self.reads: Path | None = None  # set: the only folder this server can read (a server on another machine)

    def load(self, name: str, path: str) -> None:
        from safetensors.torch import load_file

        if name in self.adapters:
            raise ValueError(f"adapter {name} already loaded")  # vLLM refuses a name twice
        if self.reads is not None and not Path(path).is_relative_to(self.reads):
            raise ValueError(f"Loading lora {name} failed: No adapter found for {path}")  # vLLM's 400
        shutil.copytree(path, self.store / name)
        self.adapters[name] = load_file(str(self.store / name / "adapter_model.safetensors"))
        self.b_norms.append(sum(float(t.abs().sum()) for k, t in self.adapters[name].items() if "lora_B" in k))

    def unload(self, name: str) -> None:
        del self.adapters[name]
        shutil.rmtree(self.store / name)

    def complete(self, body: dict) -> dict:
        from peft import PeftModel

        from alignkit.generation import SamplingParams, make_engine

        name = body["model"]
        if name not in self.adapters:
            raise KeyError(f"model {name} is not loaded")
        with self.lock:  # one request at a time: the adapter is put onto the shared base weights
            model = PeftModel.from_pretrained(self.model, str(self.store / name))
            engine = make_engine("hf", model=model, tokenizer=self.tokenizer)
            params = SamplingParams(n=body["n"], max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                    seed=body.get("seed"))
            samples = engine.generate([body["prompt"]], params, progress=False)[0]
            model.unload()
        return {"choices": [{"index": i, "text": c.text, "token_ids": c.token_ids,
                             "finish_reason": "length" if c.finish_reason == "length" else "stop",
                             "stop_reason": None} for i, c in enumerate(samples)]}


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802 (http.server's naming)
        server: LoRAServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        endpoint = self.path.rsplit("/", 1)[-1]
        try:
            if endpoint == "load_lora_adapter":
                server.load(body["lora_name"], body["lora_path"])
                answer, kind = b"Success: LoRA adapter loaded", "text/plain"
            elif endpoint == "unload_lora_adapter":
                server.unload(body["lora_name"])
                answer, kind = b"Success: LoRA adapter unloaded", "text/plain"
            elif endpoint == "completions":
                assert body.get("return_token_ids") is True, "ppo must ask for exact token ids"
                answer, kind = json.dumps(server.complete(body)).encode(), "application/json"
            else:
                self.send_error(404)
                return
            server.log.append((endpoint, body.get("lora_name") or body.get("model")))
        except (KeyError, ValueError) as error:
            self.send_error(400, str(error))
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def lora_server(steerable_model_dir, tmp_path):
    (tmp_path / "server").mkdir()
    server = LoRAServer(steerable_model_dir, tmp_path / "server")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_ppo_loads_each_steps_adapter_into_the_server(tmp_path, steerable_model_dir, lora_server):
    url = f"http://127.0.0.1:{lora_server.server_address[1]}/v1"
    manifest, history, _ = run_stage(tmp_path, steerable_model_dir, f"""
        - kind: ppo
          rewards: [{{program: rewards.py:digit_count}}]
          generation: {{backend: openai, base_url: "{url}", model_name: base, serve_adapter: true}}
          num_generations: 2
          batch_size: 4
          max_steps: 3
          save_steps: 3
    """)
    assert manifest.status == "done"
    loads = [name for endpoint, name in lora_server.log if endpoint == "load_lora_adapter"]
    token = loads[0].split("-")[2]
    names = [f"ppo-rank0-{token}-v{i}" for i in (1, 2, 3)]
    unloads = [name for endpoint, name in lora_server.log if endpoint == "unload_lora_adapter"]
    sampled = [name for endpoint, name in lora_server.log if endpoint == "completions"]
    assert loads == names and unloads == names  # each version retired when the next is in; the last at the end
    assert sampled == [name for name in names for _ in range(2)]  # 2 prompts per step, each from its step's adapter
    assert lora_server.adapters == {}
    assert not any((Path(manifest.artifacts["model"]).parent / "served_adapters").iterdir())
    # the adapters the server read are the policy's at each step: B starts at zero (LoRA's init), then moves
    # as PPO updates it; steps of the run's history carry the sync's cost
    b = lora_server.b_norms
    assert b[0] == 0 and 0 < b[1] != b[2], b
    assert all(row["time/adapter_sync_s"] > 0 for row in history) and len(history) == 3
    assert all(0 < row["response/length"] <= 8 for row in history)


def test_served_adapter_versions_hold_the_policys_weights(tmp_path, steerable_model_dir, lora_server):
    """Version 1 is LoRA's zero-B init; version 2 is what the policy holds after an update (read back exactly)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.generation.served_lora import AdapterSyncEngine

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(steerable_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    spec = generation_spec(backend="openai", base_url=f"http://127.0.0.1:{lora_server.server_address[1]}/v1",
                           model_name="base", serve_adapter=True)
    engine = AdapterSyncEngine(spec.served_engine(token_ids=True), policy, tmp_path / "adapters", name="t")
    # a crashed earlier run left its first version loaded on the server: this run's names do not collide with it
    lora_server.adapters["t-v1"] = {}
    engine.sync()
    stale = lora_server.adapters.pop("t-v1")
    assert stale == {}
    first = dict(lora_server.adapters[f"{engine.name}-v1"])
    assert all(torch.count_nonzero(t) == 0 for k, t in first.items() if "lora_B" in k)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    engine.sync()
    second = lora_server.adapters[f"{engine.name}-v2"]
    assert set(lora_server.adapters) == {f"{engine.name}-v2"}
    assert not (tmp_path / "adapters" / f"{engine.name}-v1").exists()
    assert all(torch.all(t == 0.5) for k, t in second.items() if "lora_B" in k)
    assert engine.served.model_name == f"{engine.name}-v2"
    engine.close()
    assert lora_server.adapters == {}


def test_serve_adapter_is_refused_where_nothing_is_trained_and_openai_ppo_needs_it(tmp_path, tiny_model_dir):
    from test_stage_ppo import write_recipe

    from alignkit.run.recipe import load_recipe

    spec = generation_spec(backend="openai", base_url="http://127.0.0.1:9/v1", model_name="m", serve_adapter=True)
    with pytest.raises(RecipeError) as info:
        spec.build()
    assert info.value.field == "generation.serve_adapter"
    recipe = write_recipe(tmp_path, tiny_model_dir, """
        - kind: ppo
          rewards: [{program: rewards.py:digit_count}]
          generation: {backend: openai, base_url: "http://127.0.0.1:9/v1", model_name: m}
    """)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert info.value.field == "stages.ppo.generation.serve_adapter" and "serve_adapter: true" in str(info.value)


def test_grpo_samples_from_the_server_with_each_steps_adapter(tmp_path, steerable_model_dir, lora_server):
    """grpo with generation {backend: openai, serve_adapter: true}: TRL's trainer, our served sampling: each
    optimizer step's adapter is loaded (one sampling call per generation batch), the previous one unloaded."""
    from test_stage_grpo import run_stage as run_grpo

    url = f"http://127.0.0.1:{lora_server.server_address[1]}/v1"
    manifest, logged = run_grpo(tmp_path, steerable_model_dir, f"""
        - kind: grpo
          lora: {{r: 4, alpha: 8, dropout: 0.0}}
          generation: {{backend: openai, base_url: "{url}", model_name: base, serve_adapter: true}}
          lr: 3.0e-2
          max_steps: 3
          save_steps: 3
          logging_steps: 1
    """)
    assert manifest.status == "done", manifest.error
    loads = [name for endpoint, name in lora_server.log if endpoint == "load_lora_adapter"]
    token = loads[0].split("-")[2]
    assert loads == [f"grpo-rank0-{token}-v{i}" for i in (1, 2, 3)] and lora_server.adapters == {}
    sampled = [name for endpoint, name in lora_server.log if endpoint == "completions"]
    assert sampled == [name for name in loads for _ in range(2)]  # 2 prompts x group 4 per step
    b = lora_server.b_norms
    assert b[0] == 0 and b[-1] > 0, b  # LoRA's zero-B start, then the adapter as it trains (a step whose groups
    # all score alike leaves B unchanged, so consecutive versions may be equal)
    assert len(logged) == 3 and all(0 < e["completions/mean_length"] <= 8 for e in logged)


def test_grpo_openai_needs_a_served_adapter_and_lora(tmp_path, tiny_model_dir):
    import yaml

    from alignkit.run.recipe import load_recipe

    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [0.0] * len(completions)\n")
    for generation, lora in (({"serve_adapter": False}, {"r": 4}), ({"serve_adapter": True}, None)):
        stage = {"kind": "grpo", "model": str(tiny_model_dir), "data": "arith", "rewards": [{"program": "r.py:f"}],
                 "num_generations": 4, "batch_size": 8, "lora": lora,
                 "generation": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model_name": "m",
                                **generation}}
        (tmp_path / "g.yaml").write_text(yaml.safe_dump({"name": "g", "stages": [stage]}))
        with pytest.raises(RecipeError) as info:
            load_recipe(tmp_path / "g.yaml")
        assert info.value.field == "stages.grpo.generation.serve_adapter" and "LoRA" in str(info.value)


def test_rntp_samples_from_the_server_with_each_steps_adapter_and_evaluates_locally(tmp_path, steerable_model_dir,
                                                                                    lora_server):
    """rntp trains through TRL's GRPOTrainer: with generation {backend: openai, serve_adapter: true} its training
    rollouts come from the server with each step's adapter, while the evaluation before and after (a fixed model)
    samples with `eval_generation`, here the local default: the server sees training requests only."""
    from test_rntp import ARITH_STAGE, write_recipe

    from alignkit.core.artifacts import Manifest
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    url = f"http://127.0.0.1:{lora_server.server_address[1]}/v1"
    stage = ARITH_STAGE + (
        "      lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        f"      generation: {{backend: openai, base_url: \"{url}\", model_name: base, serve_adapter: true}}\n")
    recipe = load_recipe(write_recipe(tmp_path, steerable_model_dir, stage), output_dir=str(tmp_path / "runs"))
    config = recipe.stages[0].config
    assert config.generation.serve_adapter and config.eval_generation.backend == "fast"
    run_recipe(recipe, echo=lambda *_: None)
    run_dir = recipe.stages[0].run_dir
    manifest = Manifest.read(run_dir)
    assert manifest.status == "done", manifest.error
    assert manifest.metrics["train_steps"] == 2 and (run_dir / "eval_after.jsonl").is_file()
    loads = [name for endpoint, name in lora_server.log if endpoint == "load_lora_adapter"]
    token = loads[0].split("-")[2]
    assert loads == [f"rntp-rank0-{token}-v{i}" for i in (1, 2)] and lora_server.adapters == {}
    sampled = [name for endpoint, name in lora_server.log if endpoint == "completions"]
    assert sampled == [name for name in loads for _ in range(2)]  # 2 positions x group 4 per step, nothing else


def test_a_server_that_cannot_read_the_adapter_folder_fails_with_one_actionable_line(tmp_path, steerable_model_dir,
                                                                                  lora_server):
    """A server on another machine does not see the stage's adapter folder: the first load fails at once with the
    server's answer, where the folder is and what to set, and the version written for it is removed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.core.errors import GenerationError
    from alignkit.generation.served_lora import AdapterSyncEngine

    lora_server.reads = tmp_path / "shared-mount"
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(steerable_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    spec = generation_spec(backend="openai", base_url=f"http://127.0.0.1:{lora_server.server_address[1]}/v1",
                           model_name="base", serve_adapter=True, max_retries=0)
    engine = AdapterSyncEngine(spec.served_engine(token_ids=True), policy, tmp_path / "local", name="t")
    with pytest.raises(GenerationError) as info:
        engine.sync()
    message = str(info.value)
    assert "\n" not in message and "No adapter found for" in message and "generation.adapter_dir" in message
    assert str((tmp_path / "local").resolve()) in message and lora_server.adapters == {}
    assert list((tmp_path / "local").iterdir()) == []
    # the same policy through a folder the server shares: loaded
    engine = AdapterSyncEngine(spec.served_engine(token_ids=True), policy, tmp_path / "shared-mount", name="t")
    assert engine.sync() in lora_server.adapters
    engine.close()
