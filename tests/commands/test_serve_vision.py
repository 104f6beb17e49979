"""`mlx-lora serve` on a vision-language base, against the real openai client: image_url parts with
data URLs answered as `generate --image` answers the same image file."""

import asyncio
import base64
import http.server
import threading

import openai
import pytest
from conftest import CFG_A, save_random_adapter, write_shapes
from test_serve import KEY, client, health, post, running_server

from mlx_lora.commands.serve import ApiError, parse_messages
from mlx_lora.config import GenerateConfig
from mlx_lora.inference.adapter_set import load_adapters
from mlx_lora.inference.generation import generate

QUESTION = "What colour is the square?"
TOKENS = 6


@pytest.fixture(scope="module")
def vlm_served(qwen2_vl, tmp_path_factory):
    """A server on the random Qwen2-VL with adapter a, and two of the shapes' images."""
    root = tmp_path_factory.mktemp("serve_vlm")
    adapter = save_random_adapter(qwen2_vl, root / "a", CFG_A, 1)
    images = sorted((write_shapes(root / "shapes", {"train": 2}) / "imgs").glob("*.png"))[:2]
    with running_server(["--model", str(qwen2_vl), f"--adapter=a={adapter}"], root) as (url, pid):
        yield {"url": url, "pid": pid, "model": qwen2_vl, "adapter": adapter, "images": images}


def generated(served, image, adapter: bool, prompt: str = QUESTION) -> str:
    """What `mlx-lora generate [--image IMAGE] [--adapter-path a]` writes, greedily, TOKENS tokens."""
    cfg = GenerateConfig(
        model=str(served["model"]),
        adapter_path=[str(served["adapter"])] if adapter else None,
        prompt=prompt,
        image=[str(image)] if image else None,
        max_tokens=TOKENS,
    )
    return "".join(r.text for r in generate(load_adapters(cfg).base, cfg))


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_turn(url: str, prompt: str = QUESTION) -> list[dict]:
    """One user turn: the image, then the question (the order `generate --image` puts them in)."""
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def ask(api, model: str, messages: list[dict], stream: bool = False) -> str:
    reply = api.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS, stream=stream)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
    return reply.choices[0].message.content


def test_an_image_as_a_data_url_is_answered_as_generate_image_answers_its_file(vlm_served):
    api = client(vlm_served)
    for image in vlm_served["images"]:
        for model, adapter in (("base", False), ("a", True)):
            want = generated(vlm_served, image, adapter)
            assert want and ask(api, model, image_turn(data_url(image))) == want, (image, model)
        assert ask(api, "a", image_turn(data_url(image)), stream=True) == generated(vlm_served, image, True)
    # the adapter changes the answer, so the row was given its slot
    first = vlm_served["images"][0]
    assert generated(vlm_served, first, True) != generated(vlm_served, first, False)
    assert ask(api, "base", [{"role": "user", "content": "Say hi"}]) == generated(vlm_served, None, False, "Say hi")


async def _ask_together(served, requests: list[tuple[str, list[dict]]]) -> list[str]:
    api = openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(model, messages):
        reply = await api.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS)
        return reply.choices[0].message.content

    return await asyncio.gather(*(one(m, msgs) for m, msgs in requests))


def test_requests_sent_together_are_answered_in_turn_each_as_alone(vlm_served):
    one, two = vlm_served["images"]
    requests = [("a", image_turn(data_url(one))), ("base", image_turn(data_url(two))), ("a", image_turn(data_url(two)))]
    answers = asyncio.run(_ask_together(vlm_served, requests))
    expected = [generated(vlm_served, one, True), generated(vlm_served, two, False), generated(vlm_served, two, True)]
    assert answers == expected
    assert health(vlm_served)["in_flight"] == 0


class Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_bad_image_parts_get_a_4xx_json_and_the_server_goes_on(vlm_served):
    listener = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    image = f"http://127.0.0.1:{listener.server_port}/cat.png"
    png = data_url(vlm_served["images"][0])
    not_an_image = "data:image/png;base64," + base64.b64encode(b"hello, not a png").decode()
    user = lambda *parts: [{"role": "user", "content": list(parts)}]
    text = {"type": "text", "text": QUESTION}
    cases = {
        "an http URL": (image_turn(image), "only data URLs"),
        "an https URL": (image_turn("https://example.com/cat.png"), "only data URLs"),
        "not base64": (image_turn("data:image/png;base64,@@@not base64@@@"), "cannot read it"),
        "no ;base64": (image_turn("data:image/png," + png.partition(",")[2]), "not a base64 data URL"),
        "not an image": (image_turn(not_an_image), "cannot read it"),
        "a url that is not a string": (image_turn(5), "image_url"),
        "image_url not an object": (user({"type": "image_url", "image_url": png}, text), "must be a text part or"),
        "an unknown part": (user({"type": "image_url", "image_url": {"url": png}}, {"type": "audio"}), "text part"),
        "an image in the assistant's turn": (
            [*image_turn(png), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": png}}]}],
            "only a user turn",
        ),
    }
    try:
        for name, (messages, words) in cases.items():
            response = post(
                vlm_served, "/v1/chat/completions", {"model": "base", "messages": messages, "max_tokens": 2}
            )
            assert response.status_code == 400, (name, response.text)
            error = response.json()["error"]
            assert words in error["message"] and error["type"] == "invalid_request_error", (name, error)
        with pytest.raises(openai.BadRequestError, match="only data URLs"):
            client(vlm_served).chat.completions.create(model="a", messages=image_turn(image), max_tokens=2)
    finally:
        listener.shutdown()
    assert Recorder.hits == []  # nothing was fetched
    assert ask(client(vlm_served), "a", image_turn(png)) == generated(vlm_served, vlm_served["images"][0], True)
    assert health(vlm_served)["in_flight"] == 0


def test_image_parts_on_a_text_model_and_parts_of_no_known_kind_are_refused():
    body = {"messages": image_turn("data:image/png;base64,AAAA")}
    with pytest.raises(ApiError, match="need a vision-language base") as refused:
        parse_messages(body, vision=False)
    assert refused.value.status == 400
    for vision in (False, True):  # a list holding neither text nor image parts is refused as before
        with pytest.raises(ApiError, match="must be text") as refused:
            parse_messages({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, vision=vision)
        assert refused.value.status == 400
    assert parse_messages({"messages": [{"role": "user", "content": "hi"}]}) == (
        [{"role": "user", "content": "hi"}],
        [],
    )
