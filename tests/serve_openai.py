"""Drives `deem serve` with the official `openai` client (run by tests/serve.rs).

    python tests/serve_openai.py BASE_URL IMAGE_DATA_URL_FILE SOI_TOKEN_ID

Prints one JSON line of what it saw; the Rust test asserts on it.
"""
import base64
import json
import sys

from openai import OpenAI

base, image_file, soi = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key="not-needed", max_retries=0, timeout=120)
image_url = open(image_file).read()
report = {"models": [m.id for m in client.models.list()]}

# Streaming, with an image in; <|startofimage|> forced first so one image is drawn, then text.
stream = client.chat.completions.create(
    model="tiny",
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "Draw something like this, then describe it."},
    ]}],
    stream=True,
    stream_options={"include_usage": True},
    max_tokens=6,
    seed=7,
    logit_bias={soi: 100, "2": -100},
    extra_body={"max_images": 1, "ddim_steps": 2, "guidance_scale": 2.0},
)
text_chunks, images, png_bytes, finish, csr, usage = 0, 0, 0, None, None, None
for chunk in stream:
    extra = chunk.model_extra or {}
    if "deem" in extra:
        csr = extra["deem"]["input_images"][0]["csr_loss"]
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        content = choice.delta.content
        if isinstance(content, str) and content:
            text_chunks += 1
        elif isinstance(content, list):
            for part in content:
                url = part["image_url"]["url"] if isinstance(part, dict) else part.image_url.url
                prefix = "data:image/png;base64,"
                assert url.startswith(prefix), url[:40]
                png = base64.b64decode(url[len(prefix):])
                assert png[:8] == b"\x89PNG\r\n\x1a\n"
                images += 1
                png_bytes += len(png)
        if choice.finish_reason:
            finish = choice.finish_reason
report.update(stream_text_chunks=text_chunks, stream_images=images, stream_image_png_bytes=png_bytes,
              stream_finish=finish, csr_loss=csr, stream_usage_completion=usage)

# Non-streaming.
r = client.chat.completions.create(
    model="tiny",
    messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}],
    max_tokens=6,
    seed=1,
    temperature=0.8,
    logit_bias={"2": -100},
)
report.update(plain_text=r.choices[0].message.content, plain_finish=r.choices[0].finish_reason,
              plain_usage_completion=r.usage.completion_tokens)
print(json.dumps(report))
