//! The generation service: batched decoding equals one-at-a-time decoding, the OpenAI wire format (as
//! the official `openai` Python client sees it), limits and faults (422, 429, 401, 413, timeouts,
//! client disconnects), CSR scores, graceful shutdown, and the playground in headless Chromium.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deem::config::DeemConfig;
use deem::text::tokenizer::load_tokenizer;
use deem_actors::runtime::metrics::Metrics;
use deem_actors::runtime::topology::Topology;
use deem_actors::serve::{openai, validation, Service};
use deem_actors::serve::{Engine, Event, Weights};
use serde_json::{json, Value};
use tch::Tensor;

fn cfg() -> DeemConfig {
    let mut c: DeemConfig = toml::from_str(include_str!("../configs/tiny.toml")).unwrap();
    c.serve.ddim_steps = 3;
    c.serve.csr_timesteps = vec![500];
    c
}

fn topology(c: &DeemConfig) -> Topology {
    Topology::load(&common::root().join("topologies/cpu.toml"), c, 0).unwrap()
}

async fn service(c: DeemConfig, api_key: Option<&str>) -> Service {
    let tok = load_tokenizer(None, None, &c).unwrap();
    Service::start(
        "127.0.0.1:0".parse().unwrap(),
        c.clone(),
        &topology(&c),
        &Weights::Init,
        tok,
        api_key.map(String::from),
        Metrics::new(),
    )
    .await
    .unwrap()
}

fn url(s: &Service, path: &str) -> String {
    format!("http://{}{path}", s.addr)
}

/// A PNG of a red square on grey, as a data: URL.
fn png_data_url(side: u32) -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        let inside = (side / 4..3 * side / 4).contains(&x) && (side / 4..3 * side / 4).contains(&y);
        if inside {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([128, 128, 128])
        }
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    )
}

/// The whole response of one request as (text, images, finish reason).
async fn collect(rx: deem_actors::serve::events::Events) -> (String, usize, String) {
    let (mut text, mut images) = (String::new(), 0);
    while let Ok(ev) = rx.recv_async().await {
        match ev.unwrap_or_else(|message| panic!("generation failed: {message}")) {
            Event::Text(t) => text.push_str(&t),
            Event::Image(_) => images += 1,
            Event::Csr(_) => {}
            Event::Done { finish_reason, .. } => return (text, images, finish_reason.into()),
        }
    }
    panic!("the stream ended without Done")
}

type Reply = (String, usize, String);

/// The engine request of an API body.
fn request_of(
    b: &Value,
    c: &DeemConfig,
    tok: &deem::text::tokenizer::DeemTokenizer,
) -> deem_actors::serve::ValidRequest {
    validation::validate(
        openai::parse(b.to_string().as_bytes()).unwrap(),
        c,
        tok,
        "tiny",
    )
    .unwrap()
}

/// Each body's reply when all are queued at once (so they decode in shared ticks), then when each runs
/// alone.
async fn together_then_alone(
    engine: &Engine,
    bodies: &[Value],
    c: &DeemConfig,
    tok: &deem::text::tokenizer::DeemTokenizer,
) -> (Vec<Reply>, Vec<Reply>) {
    let build = |b: &Value| request_of(b, c, tok);
    let rxs: Vec<_> = bodies
        .iter()
        .map(|b| engine.submit(build(b)).ok().unwrap())
        .collect();
    let mut together = Vec::new();
    for rx in rxs {
        together.push(collect(rx).await);
    }
    let mut alone = Vec::new();
    for b in bodies {
        alone.push(collect(engine.submit(build(b)).ok().unwrap()).await);
    }
    (together, alone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_decoding_gives_the_tokens_of_one_at_a_time_decoding() {
    let c = cfg();
    let tok = load_tokenizer(None, None, &c).unwrap();
    let tok = Arc::new(tok);
    let metrics = Metrics::new();
    let engine = Engine::start(
        &c,
        &topology(&c),
        &Weights::Init,
        tok.clone(),
        metrics.clone(),
    )
    .await
    .unwrap();
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            let mut b = json!({
                "messages": [{"role": "user", "content": format!("tell me about shape {i}")}],
                "max_tokens": 12 + i, "seed": 100 + i, "temperature": 0.9, "top_p": 0.95,
            });
            if i == 0 {
                b["temperature"] = json!(0.0);
            }
            if i == 1 {
                b["top_k"] = json!(5);
                b["repetition_penalty"] = json!(1.3);
            }
            if i == 2 {
                // Forces <|startofimage|> first: one image is drawn mid-stream, then text continues.
                b["logit_bias"] = json!({ (c.llm.vocab_size).to_string(): 100 });
                b["max_images"] = json!(1);
            }
            if i == 3 {
                b["messages"][0]["content"] = json!([
                    {"type": "image_url", "image_url": {"url": png_data_url(48)}},
                    {"type": "text", "text": "what is this?"}
                ]);
            }
            b
        })
        .collect();
    let (together, alone) = together_then_alone(&engine, &bodies, &c, &tok).await;
    // Some ticks carried several sequences (the histogram's sum exceeds its count; the one-sequence
    // ticks of the requests alone add as much to both).
    let text = metrics.encode();
    let stat = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap()
    };
    assert!(
        stat("deem_serve_batch_size_sequences_sum") > stat("deem_serve_batch_size_sequences_count"),
        "no tick batched several sequences"
    );
    engine.shutdown().await;
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(t, a, "request {i}: batched and alone differ");
        assert!(!t.0.is_empty() || t.1 > 0, "request {i} generated nothing");
    }
    assert_eq!(
        together[2].1, 1,
        "the forced <|startofimage|> drew one image"
    );
    // The greedy request repeats itself exactly.
    assert_eq!(together[0].2, "length");
}

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
    let m = client
        .get(url(&s, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("deem_serve_requests_total{status=\"invalid\"} 15"),
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
    let r = post_as(&client, &s, Some("wrong"), &body).await;
    assert_eq!(r.status().as_u16(), 401);
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

async fn metric(client: &reqwest::Client, s: &Service, name: &str) -> f64 {
    let text = client
        .get(url(s, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b' ')
                    || l.as_bytes().get(name.len()) == Some(&b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    let text = post_as(&client, &s, None, &streaming)
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let err: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["type"], "timeout", "{text}");
    assert_eq!(*events.last().unwrap(), "[DONE]");

    s.stop().await.unwrap();
}

/// A serving worker's compute thread dies mid-stream (the `[fault]` hook: the last LLM shard panics at
/// its fourth tick): its supervisor marks it failed, the stream in flight gets an error event and
/// `[DONE]`, `/ready` turns 503 naming the worker, a new request gets 503, the failure is counted, and
/// the service still shuts down — each step bounded in time, so nothing can hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_fails_its_streams_and_turns_ready_503() {
    let mut c = cfg();
    c.fault = Some(deem::config::FaultConfig {
        kill_actor: "llm1".into(),
        at_step: 3,
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
    let text = post_as(&client, &s, None, &long)
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]", "{text}");
    let err: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
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

/// A free TCP port on the loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let port = free_port();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_directory_serves_the_weights_it_holds() {
    let c = cfg();
    let tok = Arc::new(load_tokenizer(None, None, &c).unwrap());
    let dir = common::scratch("serve-checkpoint");
    let weights = deem::models::deem::initial_weights(&c).unwrap();
    let named: Vec<(String, tch::Tensor)> = weights.into_iter().collect();
    deem::checkpoint::save(&dir.join("model.safetensors"), &named).unwrap();
    let body = json!({"messages": [{"role": "user", "content": "same weights"}], "max_tokens": 8,
                      "seed": 11, "temperature": 0.7});
    let mut texts = Vec::new();
    for w in [Weights::Init, Weights::Checkpoint(dir.clone())] {
        let engine = Engine::start(&c, &topology(&c), &w, tok.clone(), Metrics::new())
            .await
            .unwrap();
        let r = validation::validate(
            openai::parse(body.to_string().as_bytes()).unwrap(),
            &c,
            &tok,
            "tiny",
        )
        .unwrap();
        texts.push(collect(engine.submit(r).ok().unwrap()).await);
        engine.shutdown().await;
    }
    assert_eq!(texts[0], texts[1]);

    // A checkpoint missing a component's weights is refused at start, naming the file and the keys.
    let partial: Vec<(String, tch::Tensor)> = named
        .iter()
        .filter(|(k, _)| !k.starts_with("unet."))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let bad = common::scratch("serve-checkpoint-bad");
    deem::checkpoint::save(&bad.join("model.safetensors"), &partial).unwrap();
    let err = match Engine::start(
        &c,
        &topology(&c),
        &Weights::Checkpoint(bad.clone()),
        tok,
        Metrics::new(),
    )
    .await
    {
        Ok(_) => panic!("a checkpoint without the UNet started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cannot start actor diffusion"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("unet.conv_in.weight"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pope_evaluation_runs_through_the_generation_actors() {
    let c = cfg();
    let dir = common::scratch("eval-pope");
    let o = deem::data::synth::SynthOptions {
        seed: 1,
        size: 32,
        pairs: 0,
        documents: 0,
        instructions: 0,
        max_turns: 1,
        regions: 0,
        text_scenes: 0,
        colour_questions: 0,
        label_questions: 0,
        shape_twins: 0,
        eval_per_split: 3,
    };
    deem::data::synth::synthesize(&dir, &o).unwrap();
    let inst = deem::eval::read_instances(&dir.join("eval/a/instances.json")).unwrap();
    let qs = deem::eval::build_pope(&inst, deem::eval::PopeSampling::Adversarial, 2, 0);
    let lines: Vec<String> = qs
        .iter()
        .map(|q| serde_json::to_string(q).unwrap())
        .collect();
    let f = dir.join("eval/a/pope_adversarial.jsonl");
    std::fs::write(&f, lines.join("\n")).unwrap();
    let split = deem_actors::cli::eval::pope_split(&f).unwrap();
    assert_eq!(split.name, "pope/adversarial");
    let tok = Arc::new(load_tokenizer(None, None, &c).unwrap());
    let results = deem_actors::cli::eval::evaluate(
        &c,
        &topology(&c),
        &Weights::Init,
        tok,
        vec![split],
        &deem_actors::cli::eval::Decoding {
            max_tokens: 4,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = &results[0];
    assert_eq!(r.answers.len(), qs.len());
    assert_eq!(r.scores.n, qs.len());
    // The scores are those of the parsed answers.
    let pred: Vec<bool> = r
        .answers
        .iter()
        .map(|(_, a)| deem::eval::parse_yes_no(a))
        .collect();
    let label: Vec<bool> = r.answers.iter().map(|(q, _)| q.label == "yes").collect();
    assert_eq!(r.scores, deem::eval::score(&pred, &label));
    let table = deem_actors::cli::eval::table(&results);
    assert!(
        table.contains(&format!("| pope/adversarial | {} |", qs.len())),
        "{table}"
    );
}

/// Beam search by recomputing every hypothesis whole (no caches, no batching): the reference for the
/// engine's forked caches. Returns the best hypothesis' text and whether it ended with EOS.
fn reference_beam(
    c: &DeemConfig,
    shard: &deem::models::llama::LlamaShard,
    tok: &deem::text::tokenizer::DeemTokenizer,
    req: &deem_actors::serve::ValidRequest,
) -> (String, bool) {
    use deem::text::sampling::{top_log_probs, BeamSearch};
    let ids = deem::models::deem::special_ids(c);
    let eos = c.llm.eos_token_id;
    let mut b = BeamSearch::new(req.num_beams, eos, req.max_tokens, 1.0);
    while !b.is_done() {
        let cands: Vec<Vec<(i64, f64)>> = b
            .live()
            .iter()
            .map(|h| {
                let seq: Vec<i64> = req.prompt.iter().chain(&h.tokens).copied().collect();
                let logits = tch::no_grad(|| {
                    shard.forward_ids(&tch::Tensor::from_slice(&seq).unsqueeze(0), 0, None)
                });
                let last: Vec<f64> = Vec::try_from(
                    logits
                        .get(0)
                        .get(seq.len() as i64 - 1)
                        .to_kind(tch::Kind::Double),
                )
                .unwrap();
                let seen = if req.params.repetition_penalty != 1.0 {
                    seq.clone()
                } else {
                    vec![]
                };
                top_log_probs(
                    last,
                    &req.params,
                    &seen,
                    &[ids.sniffer, ids.soi],
                    b.candidates_needed(),
                )
            })
            .collect();
        b.step(&cands);
    }
    let best = b.best().unwrap();
    let text: Vec<u32> = best
        .tokens
        .iter()
        .filter(|&&t| t != eos)
        .map(|&t| t as u32)
        .collect();
    (
        tok.decode(&text, true).unwrap(),
        best.tokens.last() == Some(&eos),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beam_search_through_the_actors_equals_whole_sequence_beam_search() {
    let mut c = cfg();
    // 3 beams per request and 8 slots: the third request waits until a running one frees its slots.
    c.serve.max_running = 8;
    let tok = Arc::new(load_tokenizer(None, None, &c).unwrap());
    let engine = Engine::start(
        &c,
        &topology(&c),
        &Weights::Init,
        tok.clone(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let eos = c.llm.eos_token_id;
    let bodies: Vec<Value> = (0..4)
        .map(|i| {
            let mut b = json!({
                "messages": [{"role": "user", "content": format!("describe shape number {i}")}],
                "max_tokens": 6, "num_beams": 3, "temperature": 0.7,
            });
            match i {
                // EOS made likely: some hypotheses finish early.
                1 => b["logit_bias"] = json!({ eos.to_string(): 3.5 }),
                2 => b["repetition_penalty"] = json!(1.3),
                3 => b["num_beams"] = json!(2),
                _ => {}
            }
            b
        })
        .collect();
    let (together, alone) = together_then_alone(&engine, &bodies, &c, &tok).await;
    // Every cache was freed, forks included.
    let mut held = usize::MAX;
    for _ in 0..50 {
        held = engine
            .status()
            .await
            .iter()
            .map(|s| s.detail.sequences)
            .sum();
        if held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine.shutdown().await;
    assert_eq!(held, 0, "beam caches left on the shards");

    let weights = deem::models::deem::initial_weights(&c).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    // Built under the init lock, as every module is: drawing its (overwritten) initial values must not
    // disturb a seeded build in another test running meanwhile.
    let shard = deem::with_init_lock(None, || {
        deem::models::llama::LlamaShard::new(
            &vs.root(),
            &deem::models::llama::LlamaConfig::from(&c.llm),
            0..c.llm.num_hidden_layers,
        )
    })
    .unwrap();
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            v.copy_(&weights[&name]);
        }
    });
    let mut ended = 0;
    for (i, b) in bodies.iter().enumerate() {
        let (text, eos_end) = reference_beam(&c, &shard, &tok, &request_of(b, &c, &tok));
        assert_eq!(
            together[i], alone[i],
            "request {i}: batched and alone differ"
        );
        assert_eq!(
            together[i].0, text,
            "request {i}: the engine's beam search differs from the reference"
        );
        assert_eq!(together[i].1, 0, "beam search draws no images");
        assert_eq!(
            together[i].2,
            if eos_end { "stop" } else { "length" },
            "request {i}"
        );
        ended += eos_end as usize;
    }
    assert!(
        ended >= 1,
        "no hypothesis ended with EOS: the EOS path went untested"
    );
    assert!(
        ended < bodies.len(),
        "every request ended with EOS: the length path went untested"
    );
}

/// A data: URL of a PNG mask `side`² whose top half is the region.
fn top_half_mask_url(side: u32) -> String {
    use base64::Engine as _;
    let m = image::GrayImage::from_fn(side, side, |_, y| {
        image::Luma([if y < side / 2 { 255 } else { 0 }])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    m.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    )
}

/// Region input through the API and the actors: `image_url.mask` gives the request one mask per image
/// (whole images all ones), the vision actor runs the mask-aware extractor on it, and the CSR score is
/// averaged over the region: the engine's scores equal the model's own on the same weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_masks_reach_the_vision_and_diffusion_actors() {
    let c = cfg();
    let tok = load_tokenizer(None, None, &c).unwrap();
    let body = |mask: bool| {
        let mut region = json!({"url": png_data_url(32)});
        if mask {
            region["mask"] = json!(top_half_mask_url(32));
        }
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(32)}},
            {"type": "text", "text": deem::data::mixer::REFERRING_PROMPT},
            {"type": "image_url", "image_url": region},
        ]}], "max_tokens": 2, "csr_score": true, "temperature": 0})
    };
    let req = request_of(&body(true), &c, &tok);
    let side = c.diffusion.image_size.max(c.vision.image_size);
    let masks = req
        .masks
        .as_ref()
        .expect("a masked image gives the request masks");
    assert_eq!(masks.size(), [2, 1, side, side]);
    assert_eq!(
        masks.get(0),
        Tensor::ones([1, side, side], (tch::Kind::Float, tch::Device::Cpu))
    );
    // The 32-px mask goes through the image's own resize to the model's side.
    let top: Vec<bool> = (0..32 * 32).map(|i| i < 32 * 16).collect();
    let want = deem::models::region::unit_mask(&top, 32, 32, side as u32).unwrap();
    assert_eq!(masks.get(1), want);
    assert!(request_of(&body(false), &c, &tok).masks.is_none());

    // The model's own CSR scores on the initial weights, with and without the masks.
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = deem::with_init_lock(Some(c.train.seed), || {
        deem::models::deem::Deem::new(&vs.root(), &c)
    })
    .unwrap();
    let px = req.images.as_ref().unwrap();
    let own = |m: Option<&Tensor>| {
        tch::no_grad(|| {
            let cond = model.vision.forward_regions(px, m).1;
            model
                .diffusion
                .csr_scores(&cond, px, m, &c.serve.csr_timesteps, 0)
        })
    };
    let engine = Engine::start(
        &c,
        &topology(&c),
        &Weights::Init,
        Arc::new(load_tokenizer(None, None, &c).unwrap()),
        Metrics::new(),
    )
    .await
    .unwrap();
    for (mask, want) in [(true, own(Some(masks))), (false, own(None))] {
        let rx = engine
            .submit(request_of(&body(mask), &c, &tok))
            .ok()
            .unwrap();
        let mut got = None;
        while let Ok(ev) = rx.recv_async().await {
            match ev.unwrap_or_else(|message| panic!("{message}")) {
                Event::Csr(s) => got = Some(s.iter().map(|x| x.csr_loss).collect::<Vec<_>>()),
                Event::Done { .. } => break,
                _ => {}
            }
        }
        let got = got.expect("CSR scores");
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-5 * w.abs().max(1.0),
                "mask {mask}: {got:?} vs {want:?}"
            );
        }
    }
    let (with, without) = (own(Some(masks)), own(None));
    assert!(
        (with[1] - without[1]).abs() > 1e-4,
        "{with:?} vs {without:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_captioning_evaluation_runs_through_the_generation_actors() {
    let c = cfg();
    let dir = common::scratch("eval-regions");
    let o = deem::data::synth::SynthOptions {
        seed: 2,
        size: 32,
        pairs: 0,
        documents: 0,
        instructions: 0,
        max_turns: 1,
        regions: 2,
        text_scenes: 0,
        colour_questions: 0,
        label_questions: 0,
        shape_twins: 0,
        eval_per_split: 0,
    };
    deem::data::synth::synthesize(&dir, &o).unwrap();
    let split = deem_actors::cli::eval::region_split(&dir.join("regions.json")).unwrap();
    assert_eq!(split.name, "regions/regions");
    let refs: Vec<String> = split.regions.iter().map(|r| r.caption.clone()).collect();
    let tok = Arc::new(load_tokenizer(None, None, &c).unwrap());
    let decoding = deem_actors::cli::eval::Decoding {
        max_tokens: 4,
        num_beams: 1,
        ..Default::default()
    };
    let ev =
        deem_actors::cli::eval::Evaluator::start(&c, &topology(&c), &Weights::Init, tok, &decoding)
            .await
            .unwrap();
    let r = ev.regions(split).await.unwrap();
    ev.shutdown().await;
    assert_eq!(r.answers.len(), refs.len());
    let answers: Vec<String> = r.answers.iter().map(|(_, a)| a.clone()).collect();
    assert_eq!(
        r.answers.iter().map(|(x, _)| x.clone()).collect::<Vec<_>>(),
        refs
    );
    assert_eq!(r.scores, deem::eval::score_captions(&answers, &refs));
    let table = deem_actors::cli::eval::caption_table(std::slice::from_ref(&r));
    assert!(
        table.contains(&format!("| regions/regions | {} |", refs.len())),
        "{table}"
    );
    let json = deem_actors::cli::eval::all_to_json(&[], std::slice::from_ref(&r));
    assert_eq!(json["regions/regions"]["answers"][0]["reference"], refs[0]);
}

/// Input images come in the formats OpenAI's API takes: PNG, JPEG, WebP and (non-animated) GIF. The
/// lossless ones decode to the PNG's pixels exactly; a JPEG to the same size; a BMP is refused naming
/// the field and the formats.
#[test]
fn image_urls_decode_png_jpeg_webp_and_gif() {
    use base64::Engine as _;
    use deem_actors::serve::validation::decode_image;
    let img = image::RgbImage::from_fn(24, 16, |x, y| {
        if (x / 4 + y / 4) % 2 == 0 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([20, 40, 200])
        }
    });
    let url = |format: image::ImageFormat, mime: &str| {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut buf, format)
            .unwrap();
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
        )
    };
    for (format, mime) in [
        (image::ImageFormat::Png, "image/png"),
        (image::ImageFormat::WebP, "image/webp"),
        (image::ImageFormat::Gif, "image/gif"),
    ] {
        let got = decode_image(&url(format, mime), "f", 64).unwrap();
        assert_eq!(got, img, "{mime}");
    }
    let jpeg = decode_image(&url(image::ImageFormat::Jpeg, "image/jpeg"), "f", 64).unwrap();
    assert_eq!(jpeg.dimensions(), (24, 16));
    // A BMP's signature: a format the server does not take.
    let mut bmp = b"BM".to_vec();
    bmp.resize(64, 0);
    let bmp_url = format!(
        "data:image/bmp;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bmp)
    );
    let err = decode_image(&bmp_url, "messages[0].content[0].image_url.url", 64).unwrap_err();
    assert!(
        err.to_string().starts_with(
            "messages[0].content[0].image_url.url: cannot decode the image (PNG, JPEG, WebP or GIF expected)"
        ),
        "{}",
        err
    );
}
