//! Serving under faults: a worker's compute thread killed while the service streams — its supervisor
//! rebuilds it in place (`serve.max_restarts`), every stream ends (done, an error event then `[DONE]`,
//! or 429), none hangs, and the service answers again; the time to recover is measured and printed.
//! `CHAOS_SEEDS` kills (default 3; `make chaos` runs 10) of `CHAOS_STREAMS` concurrent streams (200).

mod common;
#[path = "common/serving.rs"]
mod serving;

use std::time::{Duration, Instant};

use deem_actors::serve::Service;
use serde_json::{json, Value};
use serving::*;

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    Done,
    /// The stream's error event (then `[DONE]`).
    Error(String),
    /// Refused at once (429), the queue full.
    Rejected,
}

/// Posts `body` (a streaming request) and reads its stream to the end, within `limit`.
async fn run_stream(client: &reqwest::Client, s: &Service, body: Value, limit: Duration) -> Ending {
    let call = async {
        let r = client
            .post(url(s, "/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .expect("the service answers");
        let status = r.status().as_u16();
        let text = r.text().await.expect("the stream reads to its end");
        match status {
            429 => {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"]["type"], "rate_limit_error", "{text}");
                Ending::Rejected
            }
            200 => {
                let events: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                assert_eq!(events.last().copied(), Some("[DONE]"), "{text}");
                let last: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
                match last["error"]["message"].as_str() {
                    Some(m) => Ending::Error(m.to_string()),
                    None => {
                        let finish = last["choices"][0]["finish_reason"].as_str();
                        assert!(finish.is_some(), "a stream without its end: {text}");
                        Ending::Done
                    }
                }
            }
            other => panic!("status {other}: {text}"),
        }
    };
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| panic!("a stream hung past {limit:?}: {body}"))
}

async fn ready(client: &reqwest::Client, s: &Service) -> bool {
    client
        .get(url(s, "/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().as_u16() == 200)
}

/// The mix of the load: text, an input image (vision, and diffusion's CSR score), a drawn image
/// (`<|startofimage|>` forced: diffusion, then vision on the drawn image).
fn request(i: usize, soi: i64, image: &str) -> Value {
    let mut body = match i % 3 {
        0 => json!({"messages": [{"role": "user", "content": format!("tell me about {i}")}],
                    "max_tokens": 12}),
        1 => json!({"messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "what is this?"}]}],
                    "max_tokens": 8}),
        _ => json!({"messages": [{"role": "user", "content": "draw"}], "max_tokens": 3,
                    "logit_bias": {soi.to_string(): 100}}),
    };
    body["stream"] = json!(true);
    body
}

/// The default policy, one kill: the stream in flight gets an error event saying the worker is being
/// rebuilt, `/ready` comes back, the next request is served, and the restart is counted with its
/// recovery time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_rebuilt_in_place_and_the_service_answers_again() {
    let mut c = cfg();
    c.fault = Some(deem::config::FaultConfig {
        kill_actor: "llm1".into(),
        at_step: 3,
        at_op: None,
    });
    let s = service(c, None).await;
    let client = reqwest::Client::new();
    let long = json!({"messages": [{"role": "user", "content": "talk"}], "max_tokens": 1000,
                      "stream": true, "logit_bias": {"2": -100}});
    let ended = run_stream(&client, &s, long, Duration::from_secs(60)).await;
    let Ending::Error(message) = ended else {
        panic!("{ended:?}")
    };
    assert_eq!(
        message,
        "actor llm1 failed (actor llm1: the compute thread died: fault injection: actor llm1 killed at job 3); it is being rebuilt: retry shortly"
    );
    let t = Instant::now();
    while !ready(&client, &s).await {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "/ready never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v: Value = client
        .get(url(&s, "/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The rebuilt shard counts its jobs afresh.
    assert_eq!(v["actors"][2]["name"], "llm1", "{v}");
    assert_eq!(v["actors"][2]["state"], "running", "{v}");
    assert_eq!(v["actors"][2]["jobs"], 0, "{v}");
    let short = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 30,
                       "stream": true, "logit_bias": {"2": -100}});
    assert_eq!(
        run_stream(&client, &s, short, Duration::from_secs(60)).await,
        Ending::Done
    );
    let m = |name: &'static str| metric(&client, &s, name);
    assert_eq!(m("deem_actor_failures_total{actor=\"llm1\"}").await, 1.0);
    assert_eq!(m("deem_actor_restarts_total{actor=\"llm1\"}").await, 1.0);
    assert_eq!(m("deem_actor_recovery_seconds_count").await, 1.0);
    assert!(m("deem_actor_recovery_seconds_sum").await > 0.0);
    tokio::time::timeout(Duration::from_secs(30), s.stop())
        .await
        .expect("the service stops")
        .unwrap();
}

/// Chaos: `CHAOS_STREAMS` concurrent streams while a worker drawn from the seed (vision, either LLM
/// shard, diffusion) is killed at a job drawn from the seed. Every stream ends; the ones in flight at
/// the kill get an error event, the queued ones run after the rebuild; the service answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_under_a_killed_worker_all_end_and_the_service_recovers() {
    let seeds: u64 = std::env::var("CHAOS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let streams: usize = std::env::var("CHAOS_STREAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let actors = ["vision", "llm0", "llm1", "diffusion"];
    let image = png_data_url(48);
    for seed in 0..seeds {
        let mut r = deem::rng::Stream::new(seed, 0, 0, deem::rng::Purpose::Data);
        let actor = actors[r.below(1, 4)[0] as usize];
        // Jobs every load of this size reaches: ticks for a shard, batches of images otherwise.
        let job = match actor {
            "llm0" | "llm1" => 2 + r.below(1, 20)[0] as u64,
            _ => 1 + r.below(1, 5)[0] as u64,
        };
        let mut c = cfg();
        c.serve.queue_capacity = 128;
        c.fault = Some(deem::config::FaultConfig {
            kill_actor: actor.into(),
            at_step: job,
            at_op: None,
        });
        let soi = c.llm.vocab_size;
        let s = service(c, None).await;
        let client = reqwest::Client::new();
        let t0 = Instant::now();
        let finished = std::sync::atomic::AtomicBool::new(false);
        let load = async {
            let all = (0..streams).map(|i| {
                let (client, body) = (client.clone(), request(i, soi, &image));
                let s = &s;
                async move {
                    let e = run_stream(&client, s, body, Duration::from_secs(300)).await;
                    (e, t0.elapsed())
                }
            });
            let out = futures_util::future::join_all(all).await;
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
            out
        };
        // /ready is watched while the load runs: how long it answered 503.
        let watch = async {
            let (mut unready, mut since) = (Duration::ZERO, None::<Instant>);
            while !finished.load(std::sync::atomic::Ordering::SeqCst) {
                let up = ready(&client, &s).await;
                match (since, up) {
                    (None, false) => since = Some(Instant::now()),
                    (Some(t), true) => {
                        unready += t.elapsed();
                        since = None;
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            unready + since.map_or(Duration::ZERO, |t| t.elapsed())
        };
        let (ended, unready) = tokio::join!(load, watch);
        // What a client sees: from the first error event to the next stream that ends done.
        let first_error = ended
            .iter()
            .filter(|(e, _)| matches!(e, Ending::Error(_)))
            .map(|(_, t)| *t)
            .min();
        let served_again = first_error.and_then(|f| {
            ended
                .iter()
                .filter(|(e, t)| *e == Ending::Done && *t > f)
                .map(|(_, t)| *t - f)
                .min()
        });
        let endings: Vec<Ending> = ended.into_iter().map(|(e, _)| e).collect();
        let count = |f: &dyn Fn(&Ending) -> bool| endings.iter().filter(|e| f(e)).count();
        let (done, rejected) = (
            count(&|e| *e == Ending::Done),
            count(&|e| *e == Ending::Rejected),
        );
        let errors: Vec<&String> = endings
            .iter()
            .filter_map(|e| match e {
                Ending::Error(m) => Some(m),
                _ => None,
            })
            .collect();
        for m in &errors {
            assert!(
                m.starts_with(&format!(
                    "actor {actor} failed (actor {actor}: the compute thread died: fault injection"
                )) && m.ends_with("it is being rebuilt: retry shortly"),
                "seed {seed}: {m}"
            );
        }
        assert!(
            !errors.is_empty(),
            "seed {seed}: the kill of {actor} at job {job} failed no stream"
        );
        let m = |name: String| {
            let (client, s) = (&client, &s);
            async move { metric(client, s, &name).await }
        };
        assert_eq!(
            m(format!("deem_actor_failures_total{{actor=\"{actor}\"}}")).await,
            1.0,
            "seed {seed}"
        );
        assert_eq!(
            m(format!("deem_actor_restarts_total{{actor=\"{actor}\"}}")).await,
            1.0,
            "seed {seed}"
        );
        let rebuild = m("deem_actor_recovery_seconds_sum".into()).await;
        // The service answers again.
        let probe = request(0, soi, &image);
        assert_eq!(
            run_stream(&client, &s, probe, Duration::from_secs(60)).await,
            Ending::Done,
            "seed {seed}"
        );
        println!(
            "seed {seed}: {actor} killed at job {job}; {streams} streams in {:.1} s: {done} done, {} error events, {rejected} rejected (429); \
             the supervisor's rebuild {rebuild:.3} s, /ready 503 for {:.3} s, first error event to the next stream done {}",
            t0.elapsed().as_secs_f64(),
            errors.len(),
            unready.as_secs_f64(),
            served_again.map_or("(none after it)".into(), |d| format!("{:.3} s", d.as_secs_f64())),
        );
        assert_eq!(done + errors.len() + rejected, streams);
        tokio::time::timeout(Duration::from_secs(60), s.stop())
            .await
            .expect("the service stops")
            .unwrap();
    }
}
