//! Serving across processes on Gloo over 127.0.0.1: rank 0 (HTTP, admission, scheduler, vision, llm0)
//! and rank 1 (llm1, diffusion) of `topologies/cpu-2proc.toml`. The official openai client streams text
//! and a drawn image through them; a greedy request gives one process's tokens; killing rank 1 fails
//! the stream in flight with an error event and turns /ready 503.

mod common;
#[path = "common/serving.rs"]
mod serving;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Kills the processes when the test ends, passed or not.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn serve(http: u16, world: Option<(i64, u16)>) -> Child {
    serve_with(http, world, None)
}

/// [`serve`] with `config` instead of the embedded default.
fn serve_with(http: u16, world: Option<(i64, u16)>, config: Option<&std::path::Path>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deem"));
    c.current_dir(common::root())
        .env("DEEM_LOG", "warn")
        .args(["serve", "--addr", &format!("127.0.0.1:{http}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = config {
        c.arg("--config").arg(p);
    }
    if let Some((rank, master)) = world {
        c.env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", master.to_string())
            .args([
                "--topology",
                "topologies/cpu-2proc.toml",
                "--peer-timeout",
                "20",
            ]);
    }
    c.spawn().unwrap()
}

/// Two ranks of one service; returns them and rank 0's HTTP port once /ready answers 200.
async fn two_ranks(client: &reqwest::Client) -> (Procs, u16) {
    two_ranks_with(client, None).await
}

async fn two_ranks_with(
    client: &reqwest::Client,
    config: Option<&std::path::Path>,
) -> (Procs, u16) {
    let (http, master) = (common::free_port(), common::free_port());
    let procs = Procs(vec![
        serve_with(http, Some((0, master)), config),
        serve_with(common::free_port(), Some((1, master)), config),
    ]);
    wait_ready(client, http).await;
    (procs, http)
}

async fn wait_ready(client: &reqwest::Client, port: u16) {
    let started = Instant::now();
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/ready"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the service never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn greedy(client: &reqwest::Client, port: u16) -> Value {
    client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "Describe the picture."}],
                      "temperature": 0, "max_tokens": 24}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_stream_text_and_images_with_one_process_tokens() {
    let client = reqwest::Client::new();
    let (_ranks, http) = two_ranks(&client).await;
    let one_port = common::free_port();
    let _one = Procs(vec![serve(one_port, None)]);
    wait_ready(&client, one_port).await;
    // Greedy: the same tokens as one process.
    let (a, b) = (greedy(&client, http).await, greedy(&client, one_port).await);
    assert_eq!(a["choices"][0]["finish_reason"], "length", "{a}");
    assert!(
        !a["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{a}"
    );
    assert_eq!(
        a["choices"][0]["message"], b["choices"][0]["message"],
        "{a}\n{b}"
    );
    assert_eq!(a["usage"], b["usage"]);
    assert_eq!(a["usage"]["completion_tokens"], 24, "{a}");
    // The official client streams text and an image drawn on rank 1.
    let dir = common::scratch("serve-dist-openai");
    let img = dir.join("in.png");
    std::fs::write(&img, serving::png_data_url(40)).unwrap();
    let soi = serving::cfg().llm.vocab_size.to_string();
    let out = Command::new(common::root().join(".venv/bin/python"))
        .arg(common::root().join("tests/serve_openai.py"))
        .arg(format!("http://127.0.0.1:{http}/v1"))
        .arg(&img)
        .arg(soi)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["stream_images"], 1, "{report}");
    assert!(
        report["stream_image_png_bytes"].as_u64().unwrap() > 100,
        "{report}"
    );
    assert!(
        report["stream_text_chunks"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(report["csr_loss"].as_f64().unwrap().is_finite(), "{report}");
    assert_eq!(report["plain_usage_completion"], 6, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_rank_1_fails_the_stream_in_flight_and_turns_ready_503() {
    let client = reqwest::Client::new();
    let (mut ranks, http) = two_ranks(&client).await;
    let url = format!("http://127.0.0.1:{http}");
    let mut stream = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell a long story."}],
                      "temperature": 0, "max_tokens": 1024, "stream": true,
                      "logit_bias": {"2": -100}}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Once tokens flow, kill rank 1 (llm1 and diffusion).
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    ranks.0[1].kill().unwrap();
    let mut body = String::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(c)) = stream.chunk().await {
            body.push_str(&String::from_utf8_lossy(&c));
        }
    })
    .await;
    assert!(read.is_ok(), "the stream did not end after rank 1 died");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let error: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], 503, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    // Whichever of rank 0's threads to rank 1 notices first (its send or its receive) names it.
    assert!(
        message.starts_with("actor rank 1 failed (rank 0: receive from rank 1 (tag ")
            || message.starts_with("actor rank 1 failed (rank 0: send to rank 1 (tag "),
        "{message}"
    );
    assert!(
        message.ends_with("the service is not ready until it is restarted"),
        "{message}"
    );
    let ready = client.get(format!("{url}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert!(
        ready["failed"]
            .as_array()
            .unwrap()
            .contains(&json!("rank 1")),
        "{ready}"
    );
    let refused = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
}

/// A worker that dies on rank 1 (llm1, by the `[fault]` hook) is rebuilt there by rank 1's supervisor;
/// rank 0 hears the failure and the restart through the bridge: the stream in flight ends with an error
/// event saying so, `/ready` comes back, the next request is served and the restart is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dead_on_rank_1_is_rebuilt_there_and_rank_0_serves_again() {
    let dir = common::scratch("serve-dist-restart");
    let config = dir.join("deem.toml");
    let tiny = std::fs::read_to_string(common::root().join("configs/tiny.toml")).unwrap();
    std::fs::write(
        &config,
        format!("{tiny}\n[fault]\nkill_actor = \"llm1\"\nat_step = 3\n"),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let (_ranks, http) = two_ranks_with(&client, Some(&config)).await;
    let url = format!("http://127.0.0.1:{http}");
    let body = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell a long story."}],
                      "max_tokens": 1024, "stream": true, "logit_bias": {"2": -100}}))
        .send();
    let body = tokio::time::timeout(Duration::from_secs(60), async {
        body.await.unwrap().text().await.unwrap()
    })
    .await
    .expect("the stream ends");
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let error: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(
        error["error"]["message"],
        "actor llm1 failed (actor llm1: the compute thread died: fault injection: actor llm1 killed at job 3); it is being rebuilt: retry shortly"
    );
    wait_ready(&client, http).await;
    let a = greedy(&client, http).await;
    assert_eq!(a["choices"][0]["finish_reason"], "length", "{a}");
    let metrics = serving::metrics_text(&client, &url).await;
    // Rank 0 counts the restart rank 1 reported.
    assert!(
        metrics.lines().any(
            |l| l.starts_with("deem_actor_restarts_total{") && l.ends_with("actor=\"llm1\"} 1")
        ),
        "{metrics}"
    );
}

#[test]
fn worker_messages_round_trip_with_their_tensors_and_bad_bodies_are_refused() {
    use deem_actors::serve::messages::{Hidden, RowInput, RowMeta, SampleSpec, ShardIn};
    use deem_actors::serve::remote::{decode, encode, Msg};
    use tch::{Kind, Tensor};
    let x = Tensor::randn([2, 1, 8], (Kind::Float, tch::Device::Cpu));
    let y = Tensor::randn([1, 3, 8], (Kind::Float, tch::Device::Cpu));
    let seq = uuid::Uuid::from_u64_pair(1, 2);
    let msg = Msg::Shard(
        1,
        ShardIn::Tick {
            group: 3,
            epoch: 11,
            rows: vec![RowMeta {
                seq,
                start: 5,
                sample: Some(SampleSpec {
                    params: std::sync::Arc::new(deem::text::sampling::SamplingParams::default()),
                    seen: vec![1, 2, 3],
                    banned: vec![9],
                    index: 4,
                    beam: 0,
                }),
                context_from: Some(2),
            }],
            inputs: vec![RowInput::Ids {
                ids: vec![7, 8],
                visual: None,
            }],
            hidden: Hidden {
                batch: Some((vec![0, 2], x.shallow_clone())),
                rows: vec![(1, y.shallow_clone())],
            },
            error: None,
        },
    );
    let (body, tensors) = encode(&msg).unwrap();
    assert_eq!(tensors.len(), 2);
    let back: Msg = decode(&body, tensors.iter().map(|t| t.copy()).collect()).unwrap();
    let Msg::Shard(
        1,
        ShardIn::Tick {
            group: 3,
            epoch: 11,
            rows,
            hidden,
            ..
        },
    ) = back
    else {
        panic!("another message came back");
    };
    assert_eq!((rows[0].seq, rows[0].start), (seq, 5));
    assert_eq!(rows[0].sample.as_ref().unwrap().seen, vec![1, 2, 3]);
    let (idx, bx) = hidden.batch.unwrap();
    assert_eq!(idx, vec![0, 2]);
    assert!(bx.equal(&x) && hidden.rows[0].1.equal(&y));
    // Tensors missing, or left over, and garbage: errors, never a panic.
    let err = |r: Result<Msg, _>| {
        r.err()
            .map(|e: deem_actors::dist::DistError| e.to_string())
            .unwrap()
    };
    assert_eq!(
        err(decode(&body, vec![x.copy()])),
        "message header: tensor slot 1 is missing or used twice"
    );
    assert_eq!(
        err(decode(&body, vec![x.copy(), y.copy(), y.copy()])),
        "message header: 1 tensor(s) carried but not named by the message"
    );
    assert!(err(decode(&[250, 251, 252], vec![])).starts_with("message header: "));
    // A message whose body claims a huge list (after its variant tag) fails, without allocating it.
    for tag in 0u8..4 {
        let mut huge = vec![tag, 253];
        huge.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(
            err(decode(&huge, vec![])).starts_with("message header: "),
            "{tag}"
        );
    }
}
