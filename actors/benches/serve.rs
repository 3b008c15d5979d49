//! `make bench` (serving): continuous batching measured against one stream in the same run.
//!
//! 1. Throughput: generated tokens per second with 32 concurrent streams ÷ with 1 stream (goal ≥ 6).
//! 2. Time to first token at that load: p50 and p99 over the 32 streams, and one stream's alone.
//! 3. Diffusion: one image alone vs 8 drawn at once (the diffusion actor batches waiting draws).
//!
//! Tiny config, untrained weights, every actor on the CPU (topologies/cpu.toml), EOS masked so every
//! stream generates exactly `max_tokens`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deem::config::DeemConfig;
use deem::text::tokenizer::load_tokenizer;
use deem_actors::runtime::metrics::Metrics;
use deem_actors::runtime::topology::Topology;
use deem_actors::serve::{openai, validation};
use deem_actors::serve::{Engine, Event, Weights};
use serde_json::json;

const TOKENS: usize = 48;

struct Run {
    tokens: usize,
    wall: Duration,
    ttft: Vec<f64>,
}

fn run(
    engine: &Engine,
    cfg: &DeemConfig,
    tok: &deem::text::tokenizer::DeemTokenizer,
    streams: usize,
    images: bool,
) -> Run {
    let started = Instant::now();
    let mut rxs = Vec::new();
    for i in 0..streams {
        let mut body = json!({
            "messages": [{"role": "user", "content": format!("stream {i}: tell me a story")}],
            "max_tokens": if images { 1 } else { TOKENS }, "seed": i, "temperature": 0.8,
            "logit_bias": {"2": -100},
        });
        if images {
            body["logit_bias"][cfg.llm.vocab_size.to_string()] = json!(100);
            body["max_tokens"] = json!(2);
            body["max_images"] = json!(1);
        }
        let r = validation::validate(
            openai::parse(body.to_string().as_bytes()).unwrap(),
            cfg,
            tok,
            "tiny",
        )
        .unwrap();
        rxs.push((Instant::now(), engine.submit(r).ok().unwrap()));
    }
    // Every stream is read by its own thread, so each first token is timed when it arrives.
    let readers: Vec<_> = rxs
        .into_iter()
        .map(|(sent, rx)| {
            std::thread::spawn(move || {
                let mut first = None;
                while let Ok(ev) = rx.recv() {
                    match ev.unwrap_or_else(|message| panic!("{message}")) {
                        Event::Text(_) | Event::Image(_) => {
                            first.get_or_insert_with(|| sent.elapsed().as_secs_f64());
                        }
                        Event::Done {
                            completion_tokens, ..
                        } => return (completion_tokens, first.unwrap_or(f64::NAN)),
                        Event::Csr(_) => {}
                    }
                }
                panic!("the stream ended without Done")
            })
        })
        .collect();
    let mut tokens = 0;
    let mut ttft = Vec::new();
    for r in readers {
        let (n, first) = r.join().unwrap();
        tokens += n;
        ttft.push(first);
    }
    Run {
        tokens,
        wall: started.elapsed(),
        ttft,
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut cfg: DeemConfig = toml::from_str(include_str!("../../configs/tiny.toml")).unwrap();
    cfg.serve.ddim_steps = 10;
    cfg.serve.csr_score = false;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let topo = Topology::load(&root.join("topologies/cpu.toml"), &cfg, 0).unwrap();
    let tok = Arc::new(load_tokenizer(None, None, &cfg).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let engine = Engine::start(&cfg, &topo, &Weights::Init, tok.clone(), Metrics::new())
            .await
            .unwrap();
        run(&engine, &cfg, &tok, 2, false); // warm-up
        let one = run(&engine, &cfg, &tok, 1, false);
        let many = run(&engine, &cfg, &tok, 32, false);
        let tps1 = one.tokens as f64 / one.wall.as_secs_f64();
        let tps32 = many.tokens as f64 / many.wall.as_secs_f64();
        println!("serving throughput (tiny, cpu topology, {TOKENS} tokens per stream):");
        println!(
            "  1 stream:    {tps1:8.1} tokens/s  (time to first token {:.1} ms)",
            one.ttft[0] * 1e3
        );
        println!("  32 streams:  {tps32:8.1} tokens/s");
        println!("  ratio 32 ÷ 1: {:.2} (goal ≥ 6)", tps32 / tps1);
        println!(
            "  time to first token at 32 streams: p50 {:.1} ms, p99 {:.1} ms",
            pct(&many.ttft, 0.5) * 1e3,
            pct(&many.ttft, 0.99) * 1e3
        );
        let img1 = run(&engine, &cfg, &tok, 1, true);
        let img8 = run(&engine, &cfg, &tok, 8, true);
        let ips1 = 1.0 / img1.wall.as_secs_f64();
        let ips8 = 8.0 / img8.wall.as_secs_f64();
        println!(
            "drawing (10 DDIM steps, guidance {}, {} px):",
            cfg.serve.guidance_scale, cfg.diffusion.image_size
        );
        println!(
            "  1 request: {ips1:.2} images/s; 8 at once: {ips8:.2} images/s; ratio {:.2}",
            ips8 / ips1
        );
        engine.shutdown().await;
    });
}
