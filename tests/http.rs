//! The generation service over HTTP: the OpenAI wire format (as the official `openai` Python client
//! sees it), limits and faults (422, 429, 401, 413, timeouts, client disconnects, a dead worker), CSR
//! scores, readiness and graceful shutdown, and the playground in headless Chromium.

mod common;
#[path = "common/serving.rs"]
mod serving;

use std::path::Path;
use std::time::{Duration, Instant};

use deem_actors::serve::Service;
use serde_json::{json, Value};
use serving::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_streams_text_and_images() {
    let s = service(cfg(), None).await;
    let dir = common::scratch("openai");
    let img = dir.join("in.png");
    std::fs::write(&img, png_data_url(40)).unwrap();
    let py = common::root().join(".venv/bin/python");
    let script = common::root().join("tests/serve_openai.py");
    let base = format!("http://{}/v1", s.addr);
    let soi = cfg().llm.vocab_size.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .arg(script)
            .arg(base)
            .arg(img)
            .arg(soi)
            .output()
            .expect("run the openai client script")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client script failed (is `openai` installed? `bash scripts/setup.sh --test`):\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(
        report["stream_text_chunks"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert_eq!(report["stream_images"], 1, "{report}");
    assert!(
        report["stream_image_png_bytes"].as_u64().unwrap() > 100,
        "{report}"
    );
    assert_eq!(report["stream_finish"], "length", "{report}");
    assert!(report["csr_loss"].as_f64().unwrap().is_finite(), "{report}");
    assert_eq!(report["plain_finish"], "length", "{report}");
    assert!(
        !report["plain_text"].as_str().unwrap().is_empty(),
        "{report}"
    );
    assert_eq!(report["plain_usage_completion"], 6, "{report}");
    assert_eq!(report["models"], json!(["tiny"]), "{report}");
    s.stop().await.unwrap();
}

async fn post(client: &reqwest::Client, s: &Service, body: Value) -> (u16, Value) {
    let r = post_as(client, s, None, &body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A chat completion request, with a bearer token when `key` is given.
async fn post_as(
    client: &reqwest::Client,
    s: &Service,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut r = client.post(url(s, "/v1/chat/completions")).json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

fn error_message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_422_naming_the_field() {
    let mut c = cfg();
    c.serve.max_body_bytes = 64 << 10;
    let s = service(c, None).await;
    let client = reqwest::Client::new();
    let cases = [
        (json!({"model": "tiny"}), "body: missing field `messages`"),
        (json!({"messages": []}), "messages: expected at least one message"),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content: data did not match any variant of untagged enum Content",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages[0].role: expected system, user or assistant, found `robot`",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}),
            "temperature: expected a number in [0, 2], found 3",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            "max_tokens: expected an integer in 1..=1024 (serve.max_tokens_limit), found 0",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
            "n: only n = 1 is supported, found 2",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "num_beams": 0}),
            "num_beams: expected an integer in 1..=32 (serve.max_running: every beam holds a sequence slot), found 0",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "scheduler": "euler"}),
            "scheduler: expected one of \"ddim\", \"ddpm\", \"dpmsolver++\", found \"euler\"",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999": 1}}),
            "logit_bias.99999: expected a token id in [0, 1030)",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temprature": 1}),
            "temprature: unknown field `temprature`, expected one of `model`, `messages`",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}),
            "messages[0].content[0].image_url.url: expected a data: URL (data:image/png;base64,…); the server fetches nothing",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}),
            "messages[0].content[0].image_url.url: cannot decode the image",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "this region:"},
                {"type": "image_url", "image_url": {"url": png_data_url(16), "mask": png_data_url(8)}}]}]}),
            "messages[0].content[1].image_url.mask: the mask is 8×8; its image is 16×16",
        ),
    ];
    for (body, want) in cases {
        let (status, v) = post(&client, &s, body.clone()).await;
        assert_eq!(status, 422, "{body} → {v}");
        assert!(
            error_message(&v).starts_with(want),
            "{body}: got `{}`, want `{want}…`",
            error_message(&v)
        );
    }
    let (status, v) = post(
        &client,
        &s,
        json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(
        error_message(&v),
        "model: `gpt-4` is not served here; this server serves `tiny`"
    );
    // Not JSON at all.
    let r = client
        .post(url(&s, "/v1/chat/completions"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Over the body limit.
    let big = "x".repeat(100 << 10);
    let (status, _) = post(
        &client,
        &s,
        json!({"messages": [{"role": "user", "content": big}]}),
    )
    .await;
    assert_eq!(status, 413);
    // The metric counts them.
    let m = metrics_text(&client, &url(&s, "")).await;
    assert!(
        m.contains("deem_serve_requests_total{status=\"invalid\"} 16"),
        "{m}"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_readiness_csr_scores_and_graceful_shutdown() {
    let mut c = cfg();
    c.serve.ood_threshold = Some(0.0);
    let s = service(c, Some("sekrit")).await;
    let client = reqwest::Client::new();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let r = post_as(&client, &s, None, &body).await;
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    // Compared whole (in constant time): a prefix or an extension of the key is not the key.
    for wrong in ["wrong", "sekri", "sekritt", ""] {
        let r = post_as(&client, &s, Some(wrong), &body).await;
        assert_eq!(r.status().as_u16(), 401, "{wrong:?}");
    }
    let r = post_as(&client, &s, Some("sekrit"), &body).await;
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // Health, readiness and metrics stay open; the model list needs the key.
    for p in ["/health", "/ready", "/metrics", "/"] {
        assert_eq!(
            client
                .get(url(&s, p))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200,
            "{p}"
        );
    }
    let ready: Value = client
        .get(url(&s, "/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["actors"].as_array().unwrap().len(), 4, "{ready}");
    assert_eq!(
        client
            .get(url(&s, "/v1/models"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    let models: Value = client
        .get(url(&s, "/v1/models"))
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    // CSR score of an input image, flagged against the threshold, and its histogram.
    let body = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(64)}},
        {"type": "text", "text": "describe"}]}], "max_tokens": 2});
    let r = post_as(&client, &s, Some("sekrit"), &body).await;
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    let scores = v["deem"]["input_images"].as_array().unwrap();
    assert_eq!(scores.len(), 1);
    assert!(scores[0]["csr_loss"].as_f64().unwrap() > 0.0);
    assert_eq!(scores[0]["out_of_distribution"], true);
    assert_eq!(
        metric(&client, &s, "deem_serve_input_image_csr_loss_count").await,
        1.0
    );
    assert_eq!(
        metric(&client, &s, "deem_serve_ood_images_total").await,
        1.0
    );

    // Graceful shutdown: a stream in flight runs to its end.
    let mut body = json!({"messages": [{"role": "user", "content": "last one"}], "max_tokens": 3,
                          "stream": true});
    body["logit_bias"] = json!({"2": -100});
    let r = post_as(&client, &s, Some("sekrit"), &body).await;
    let stop = tokio::spawn(s.stop());
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    stop.await.unwrap().unwrap();
}

async fn wait_until(
    client: &reqwest::Client,
    s: &Service,
    name: &str,
    what: &str,
    ok: impl Fn(f64) -> bool,
) {
    let t = Instant::now();
    loop {
        let v = metric(client, s, name).await;
        if ok(v) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{name} stayed at {v}, want {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(client: &reqwest::Client, s: &Service, name: &str, want: f64) {
    wait_until(client, s, name, &want.to_string(), |v| v == want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_a_disconnect_frees_the_sequence() {
    let mut c = cfg();
    c.serve.max_running = 1;
    c.serve.queue_capacity = 1;
    let s = service(c, None).await;
    let client = reqwest::Client::new();
    let long = json!({"messages": [{"role": "user", "content": "talk"}], "max_tokens": 1000,
                      "stream": true, "logit_bias": {"2": -100}});
    // One running (streaming), one queued, the rest rejected.
    let running = post_as(&client, &s, None, &long).await;
    assert_eq!(running.status().as_u16(), 200);
    let mut stream = running.bytes_stream();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    wait_for(&client, &s, "deem_serve_num_requests_running", 1.0).await;
    wait_until(&client, &s, "deem_serve_kv_cache_bytes", "> 0", |v| v > 0.0).await;
    let queued = {
        let client = client.clone();
        let u = url(&s, "/v1/chat/completions");
        let body = json!({"messages": [{"role": "user", "content": "wait"}], "max_tokens": 2});
        tokio::spawn(async move {
            client
                .post(u)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    wait_for(&client, &s, "deem_serve_num_requests_waiting", 1.0).await;
    let r = client
        .post(url(&s, "/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "no room"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert!(
        error_message(&v).starts_with("the admission queue is full"),
        "{v}"
    );

    // The client goes away mid-stream: the sequence is cancelled and its caches freed on every shard.
    drop(stream);
    assert_eq!(
        queued.await.unwrap(),
        200,
        "the queued request runs once the slot frees"
    );
    wait_for(&client, &s, "deem_serve_num_requests_running", 0.0).await;
    wait_for(&client, &s, "deem_serve_kv_cache_bytes", 0.0).await;
    assert_eq!(
        metric(
            &client,
            &s,
            "deem_serve_requests_total{status=\"cancelled\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &client,
            &s,
            "deem_serve_requests_total{status=\"rejected\"}"
        )
        .await,
        1.0
    );
    s.stop().await.unwrap();
}

/// A streamed request that fails: the stream must end with `[DONE]`; returns the error object sent just
/// before it, and the whole stream.
async fn stream_error(client: &reqwest::Client, s: &Service, body: &Value) -> (Value, String) {
    let text = post_as(client, s, None, body).await.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last().copied(), Some("[DONE]"), "{text}");
    let err = serde_json::from_str(events[events.len() - 2]).unwrap();
    (err, text)
}

/// `serve.max_streams_per_key = 1`: while a key's stream runs, its next request is answered 429 (with
/// Retry-After); once the client drops the stream, the key's place is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holds_at_most_its_streams_in_flight() {
    let mut c = cfg();
    c.serve.max_streams_per_key = Some(1);
    let s = service(c, Some("k")).await;
    let client = reqwest::Client::new();
    let long = json!({"messages": [{"role": "user", "content": "talk"}], "max_tokens": 1000,
                      "stream": true, "logit_bias": {"2": -100}});
    let first = post_as(&client, &s, Some("k"), &long).await;
    assert_eq!(first.status().as_u16(), 200);
    let short = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let second = post_as(&client, &s, Some("k"), &short).await;
    assert_eq!(second.status().as_u16(), 429);
    assert_eq!(second.headers()["retry-after"], "1");
    let v: Value = second.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(
        error_message(&v),
        "this API key already has 1 requests in flight (serve.max_streams_per_key); retry when one ends"
    );
    drop(first);
    let started = Instant::now();
    loop {
        let r = post_as(&client, &s, Some("k"), &short).await;
        if r.status().as_u16() == 200 {
            break;
        }
        assert_eq!(r.status().as_u16(), 429);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the dropped stream's place was never given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_ends_the_request_with_504_or_an_sse_error() {
    let mut c = cfg();
    c.serve.request_timeout_s = 0.3;
    let s = service(c, None).await;
    let client = reqwest::Client::new();
    let never_ends = json!({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000,
                            "logit_bias": {"2": -100}});
    let (status, v) = post(&client, &s, never_ends.clone()).await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(
        error_message(&v),
        "the request ran past its timeout of 0.3 s"
    );
    // In a stream the timeout is an SSE error event, then [DONE].
    let mut streaming = never_ends.clone();
    streaming["stream"] = json!(true);
    let (err, text) = stream_error(&client, &s, &streaming).await;
    assert_eq!(err["error"]["type"], "timeout", "{text}");

    s.stop().await.unwrap();
}

/// With restarts off (`serve.max_restarts = 0`), a serving worker's compute thread dies mid-stream (the
/// `[fault]` hook: the last LLM shard panics at its fourth tick): its supervisor marks it failed, the
/// stream in flight gets an error event and `[DONE]`, `/ready` turns 503 naming the worker, a new
/// request gets 503, the failure is counted, and the service still shuts down — each step bounded in
/// time, so nothing can hang. (`tests/serve_chaos.rs` has the default: the worker rebuilt in place.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_restarts_off_a_dead_worker_fails_its_streams_and_turns_ready_503() {
    let mut c = cfg();
    c.serve.max_restarts = 0;
    c.fault = Some(deem::config::FaultConfig {
        kill_actor: "llm1".into(),
        at_step: 3,
        at_op: None,
    });
    let s = service(c, None).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let ready = client.get(url(&s, "/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let long = json!({"messages": [{"role": "user", "content": "talk"}], "max_tokens": 1000,
                      "stream": true, "logit_bias": {"2": -100}});
    let (err, text) = stream_error(&client, &s, &long).await;
    assert_eq!(err["error"]["type"], "server_error", "{text}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("actor llm1 failed (actor llm1: the compute thread died: fault injection: actor llm1 killed at job 3)"),
        "{message}"
    );

    let ready = client.get(url(&s, "/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let v: Value = ready.json().await.unwrap();
    assert_eq!(v["failed"], json!(["llm1"]), "{v}");
    let states: Vec<&str> = v["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["running", "running", "failed", "running"], "{v}");
    // Three ticks went through; the fourth killed the shard (counted as it began).
    assert_eq!(v["actors"][2]["jobs"], 4, "{v}");

    let (status, v) = post(
        &client,
        &s,
        json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["type"], "server_error");
    assert!(
        error_message(&v).starts_with(
            "the service is not ready: actor llm1 failed: actor llm1: the compute thread died"
        ),
        "{v}"
    );
    assert_eq!(
        metric(&client, &s, "deem_actor_failures_total{actor=\"llm1\"}").await,
        1.0
    );
    assert_eq!(
        metric(&client, &s, "deem_serve_requests_total{status=\"error\"}").await,
        1.0
    );
    tokio::time::timeout(Duration::from_secs(30), s.stop())
        .await
        .expect("the service stops after a worker died")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_streams_in_headless_chromium() {
    // Chromium driven through ChromeDriver's WebDriver HTTP API (Debian: chromium, chromium-driver).
    let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    assert!(
        Path::new(chromium).exists() && Path::new(driver).exists(),
        "headless Chromium and ChromeDriver are needed (Debian: apt-get install chromium chromium-driver; `bash scripts/setup.sh --test` installs them)"
    );
    let s = service(cfg(), None).await;
    let port = common::free_port();
    let mut chromedriver = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let wd = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{wd}/status")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = common::scratch("chromium");
    let session: Value = client
        .post(format!("{wd}/session"))
        .json(&json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.display())]
        }}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {session}"))
        .to_string();
    let page = url(&s, "/?prompt=hello%20there&send=1&max_tokens=8&seed=3");
    client
        .post(format!("{wd}/session/{sid}/url"))
        .json(&json!({ "url": page }))
        .send()
        .await
        .unwrap();
    let script = "const b = document.querySelector('.msg.assistant'); \
                  return b ? [b.dataset.done || '', b.textContent] : ['', ''];";
    let (mut done, mut text) = (String::new(), String::new());
    let t = Instant::now();
    while done.is_empty() && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let v: Value = client
            .post(format!("{wd}/session/{sid}/execute/sync"))
            .json(&json!({"script": script, "args": []}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        done = v["value"][0].as_str().unwrap_or("").to_string();
        text = v["value"][1].as_str().unwrap_or("").to_string();
    }
    let _ = client.delete(format!("{wd}/session/{sid}")).send().await;
    let _ = chromedriver.kill();
    let _ = chromedriver.wait();
    assert_eq!(done, "1", "the page did not finish streaming: {text}");
    assert!(text.contains("finish: length"), "{text}");
    let answer = text.split("finish:").next().unwrap();
    assert!(
        !answer.trim().is_empty(),
        "no streamed text in the assistant bubble: {text}"
    );
    let m = metric(&client, &s, "deem_serve_generated_tokens_total").await;
    assert_eq!(m, 8.0, "the page's request generated its 8 tokens");
    s.stop().await.unwrap();
}

/// One full-length sequence on a 2-layer shard of the tiny model, keys and values in f32: (its
/// layers, its bytes).
fn one_sequence(c: &deem::config::DeemConfig) -> (i64, u64) {
    let l = deem::models::llama::LlamaConfig::from(&c.llm);
    let layers = c.llm.num_hidden_layers / 2;
    let seq = 2 * layers * l.num_key_value_heads * l.head_dim * l.max_position_embeddings * 4;
    (layers, seq as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_budget_sets_the_sequence_slots_and_one_too_small_is_refused() {
    use deem_actors::serve::engine::budgeted;
    let mut c = cfg();
    let topo = topology(&c);
    let (layers, seq) = one_sequence(&c);
    c.serve.kv_cache_bytes = Some(3 * seq + 100);
    assert_eq!(budgeted(&c, &topo).unwrap().serve.max_running, 3);
    // In bf16 the pool holds each position in half the bytes.
    let mut half = c.clone();
    half.model.dtype = deem::config::DType::Bf16;
    assert_eq!(budgeted(&half, &topo).unwrap().serve.max_running, 6);
    c.serve.kv_cache_bytes = Some(1 << 40);
    assert_eq!(
        budgeted(&c, &topo).unwrap().serve.max_running,
        c.serve.max_running
    );
    c.serve.kv_cache_bytes = Some(seq - 1);
    assert_eq!(
        budgeted(&c, &topo).unwrap_err().to_string(),
        format!(
            "serve.kv_cache_bytes = {} cannot hold one full-length sequence on shard llm0: its {layers} layers × llm.max_position_embeddings = {} positions need {seq} bytes",
            seq - 1,
            c.llm.max_position_embeddings
        )
    );
    // A service under a two-sequence budget runs two slots: a third beam is refused up front.
    c.serve.kv_cache_bytes = Some(2 * seq);
    let s = service(c, None).await;
    let client = reqwest::Client::new();
    let (status, body) = post(
        &client,
        &s,
        json!({"messages": [{"role": "user", "content": "hi"}], "num_beams": 3, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        error_message(&body),
        "num_beams: expected an integer in 1..=2 (serve.max_running: every beam holds a sequence slot), found 3"
    );
    let (status, body) = post(
        &client,
        &s,
        json!({"messages": [{"role": "user", "content": "hi"}], "num_beams": 2, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    s.stop().await.unwrap();
}

#[test]
fn a_kv_fraction_of_the_devices_memory_sets_the_slots_and_is_validated() {
    use deem_actors::serve::engine::budgeted;
    let mut c = cfg();
    let topo = topology(&c);
    let (_, seq) = one_sequence(&c);
    let total: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1024;
    // A fraction of the machine's memory worth 3.5 sequences on the largest shard (plus its weights).
    let weights = topo
        .actors
        .iter()
        .filter(|a| a.layers.is_some())
        .map(|a| a.param_bytes)
        .max()
        .unwrap();
    c.serve.max_running = 64;
    c.serve.kv_cache_fraction = Some((3.5 * seq as f64 + weights as f64) / total as f64);
    assert_eq!(budgeted(&c, &topo).unwrap().serve.max_running, 3);
    // Too small a fraction: refused, saying how the budget came about.
    c.serve.kv_cache_fraction = Some(1e-12);
    let err = budgeted(&c, &topo).unwrap_err().to_string();
    assert!(
        err.starts_with("serve.kv_cache_fraction = 0.000000000001 of cpu's ")
            && err.contains(" cannot hold one full-length sequence on shard llm0"),
        "{err}"
    );
    c.serve.kv_cache_fraction = Some(1.5);
    c.serve.kv_cache_bytes = Some(1);
    let issues: Vec<String> = c
        .validate()
        .into_iter()
        .map(|i| format!("{}: {}", i.key, i.message))
        .collect();
    assert_eq!(
        issues,
        vec![
            "serve.kv_cache_fraction: expected a fraction in (0, 1], found 1.5".to_string(),
            "serve.kv_cache_fraction: expected either serve.kv_cache_bytes or serve.kv_cache_fraction, found both".to_string(),
        ]
    );
}
