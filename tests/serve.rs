//! The generation engine: batched decoding equals one-at-a-time decoding, beam search through the actors
//! equals whole-sequence beam search, checkpoint directories, region masks and CSR scores, evaluation
//! through the generation actors, and input image formats. The HTTP service is tested in `http.rs`.

mod common;
#[path = "common/serving.rs"]
mod serving;

use std::sync::Arc;
use std::time::Duration;

use deem::config::DeemConfig;
use deem::text::tokenizer::load_tokenizer;
use deem_actors::runtime::metrics::Metrics;
use deem_actors::serve::{openai, validation, Engine, Event, Weights};
use serde_json::{json, Value};
use serving::*;
use tch::Tensor;

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

/// Each image sampler draws through the diffusion actor: the request's `scheduler` picks it, and the
/// same request with the same seed draws the same image again (DDPM's step noise comes from the
/// request's seeded stream), while the samplers differ from each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_picks_its_image_sampler() {
    let c = cfg();
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
    let mut images = Vec::new();
    for scheduler in ["ddim", "ddpm", "dpmsolver++", "ddpm"] {
        let body = json!({
            "messages": [{"role": "user", "content": "draw"}],
            "max_tokens": 3, "seed": 5, "max_images": 1, "ddim_steps": 4, "scheduler": scheduler,
            "logit_bias": { (c.llm.vocab_size).to_string(): 100 },
        });
        let (_, drawn, _) =
            collect_images(engine.submit(request_of(&body, &c, &tok)).ok().unwrap()).await;
        let [png] = <[Vec<u8>; 1]>::try_from(drawn)
            .unwrap_or_else(|d| panic!("{scheduler}: {} images, one expected", d.len()));
        images.push(png);
    }
    engine.shutdown().await;
    assert_eq!(
        images[1], images[3],
        "ddpm with the same seed draws the same image"
    );
    assert_ne!(images[0], images[1]);
    assert_ne!(images[1], images[2]);
    assert_ne!(images[0], images[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_runs_in_the_model_dtype() {
    // (The KV pool's share of the budget in bf16 is checked in http.rs.)
    let mut c = cfg();
    c.model.dtype = deem::config::DType::Bf16;
    // Forces <|startofimage|> (the diffusion actor draws in bf16 too), then token 10 until max_tokens.
    let body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(48)}},
            {"type": "text", "text": "draw it again"}
        ]}],
        "max_tokens": 6, "seed": 3, "max_images": 1,
        "logit_bias": { (c.llm.vocab_size).to_string(): 100, "10": 50 },
    });
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
    let (text, images, finish) =
        collect(engine.submit(request_of(&body, &c, &tok)).ok().unwrap()).await;
    engine.shutdown().await;
    assert_eq!((images, finish.as_str()), (1, "length"), "{text}");
    assert!(!text.is_empty());
}
