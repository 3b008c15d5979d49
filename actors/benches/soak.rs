//! `make soak` (`SOAK_MINUTES`, default 3): the service under steady load, after the soak tests
//! operators run before a release. The tiny model serves on the embedded CPU topology while eight
//! clients loop over a mix of requests — streamed and whole chat completions, some with an image — and
//! of invalid ones (malformed JSON, an unknown model, a prompt past the context, too many images, a PNG
//! declaring 20000×20000 pixels, a body past `serve.max_body_bytes`). The process's resident memory is
//! sampled every second; the report gives the growth from the end of the warm-up (the first fifth) to
//! the end (means over ten seconds; goal: under 5%), the requests by status, and writes the curve to `docs/soak.csv` and
//! `docs/soak.png`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use deem::config::DeemConfig;
use deem_actors::pipeline::costs::resident_bytes;
use deem_actors::runtime::metrics::Metrics;
use deem_actors::runtime::topology::{Topology, EMBEDDED_CPU};
use deem_actors::serve::{Service, Weights};
use plotters::prelude::*;
use serde_json::json;

fn png_url(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 40, 40]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    )
}

/// A PNG whose header declares `side × side` pixels, with no pixel data behind it.
fn lying_png(side: u32) -> String {
    let mut v = png_url(8, 8).into_bytes();
    let prefix = "data:image/png;base64,".len();
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(&v[prefix..])
        .unwrap();
    raw[16..20].copy_from_slice(&side.to_be_bytes());
    raw[20..24].copy_from_slice(&side.to_be_bytes());
    // The header chunk's CRC (over its type and data), so the lie is a well-formed header.
    let crc = crc32(&raw[12..29]);
    raw[29..33].copy_from_slice(&crc.to_be_bytes());
    raw.truncate(33);
    v.truncate(prefix);
    format!(
        "{}{}",
        String::from_utf8(v).unwrap(),
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Request `i` of the mix: (body, whether it streams).
fn request(i: u64, image: &str, lying: &str, c: &DeemConfig) -> (Vec<u8>, bool) {
    let user =
        |content: serde_json::Value| json!({"messages": [{"role": "user", "content": content}]});
    let with_image = json!([{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is this?"}]);
    let mut v = match i % 10 {
        0..=2 => user(json!("tell me about the red star")),
        3 | 4 => user(with_image),
        5 => return (b"{\"messages\": [".to_vec(), false),
        6 => {
            let mut r = user(json!("hi"));
            r["model"] = json!("no-such-model");
            r
        }
        7 => user(json!(
            "word ".repeat(c.llm.max_position_embeddings as usize * 2)
        )),
        8 => {
            let parts: Vec<_> = (0..c.serve.max_images_per_request + 1)
                .map(|_| json!({"type": "image_url", "image_url": {"url": image}}))
                .collect();
            user(json!(parts))
        }
        _ if i % 20 == 9 => user(json!([{"type": "image_url", "image_url": {"url": lying}}])),
        _ => return (vec![b' '; c.serve.max_body_bytes + 1], false),
    };
    v["max_tokens"] = json!(6);
    let stream = i % 2 == 0;
    v["stream"] = json!(stream);
    (v.to_string().into_bytes(), stream)
}

fn plot(samples: &[(f64, f64)], warm: f64, path: &std::path::Path) {
    if !deem_actors::cli::report::fonts() {
        println!("soak: no DejaVu font (Debian's fonts-dejavu-core): the plot is skipped");
        return;
    }
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let (t_max, m_max) = samples
        .iter()
        .fold((1.0f64, 1.0f64), |(t, m), &(a, b)| (t.max(a), m.max(b)));
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "deem serve under soak load: resident memory",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..t_max, 0.0..m_max * 1.1)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()
        .unwrap();
    chart
        .draw_series(LineSeries::new(samples.iter().copied(), &BLUE))
        .unwrap();
    chart
        .draw_series(LineSeries::new([(warm, 0.0), (warm, m_max * 1.1)], &RED))
        .unwrap();
    root.present().unwrap();
}

fn main() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c: DeemConfig = toml::from_str(include_str!("../../configs/tiny.toml")).unwrap();
    c.serve.ddim_steps = 2;
    c.serve.csr_timesteps = vec![500];
    let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let samples = rt.block_on(async {
        let topo = Topology::parse(EMBEDDED_CPU, "cpu.toml", &c, 0).unwrap();
        let tok = deem::text::tokenizer::load_tokenizer(None, None, &c).unwrap();
        let s = Service::start(
            "127.0.0.1:0".parse().unwrap(),
            c.clone(),
            &topo,
            &Weights::Init,
            tok,
            None,
            Metrics::new(),
        )
        .await
        .unwrap();
        let url = format!("http://{}/v1/chat/completions", s.addr);
        let (image, lying) = (png_url(48, 48), lying_png(20_000));
        let mut clients = Vec::new();
        for k in 0..8u64 {
            let (url, image, lying, c, statuses, stop) = (
                url.clone(),
                image.clone(),
                lying.clone(),
                c.clone(),
                statuses.clone(),
                stop.clone(),
            );
            clients.push(tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(120))
                    .build()
                    .unwrap();
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let (body, _) = request(i, &image, &lying, &c);
                    // 0: the connection failed.
                    let code = match http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let code = r.status().as_u16();
                            let _ = r.bytes().await;
                            code
                        }
                        Err(_) => 0,
                    };
                    *statuses.lock().unwrap().entry(code).or_default() += 1;
                    i += 8;
                }
            }));
        }
        let started = Instant::now();
        let mut samples = Vec::new();
        while started.elapsed().as_secs_f64() < minutes * 60.0 {
            samples.push((
                started.elapsed().as_secs_f64(),
                resident_bytes() as f64 / (1 << 20) as f64,
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for cl in clients {
            let _ = cl.await;
        }
        s.stop().await.unwrap();
        samples
    });
    let warm = minutes * 60.0 / 5.0;
    // Means over ten seconds, so one sample's noise (a batch in flight) does not decide.
    let mean = |v: &[(f64, f64)]| v.iter().map(|s| s.1).sum::<f64>() / v.len().max(1) as f64;
    let from = samples.iter().position(|(t, _)| *t >= warm).unwrap_or(0);
    let at_warm = mean(&samples[from..(from + 10).min(samples.len())]);
    let end = mean(&samples[samples.len().saturating_sub(10)..]);
    let growth = 100.0 * (end - at_warm) / at_warm.max(1e-9);
    let counts: Vec<String> = statuses
        .lock()
        .unwrap()
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect();
    println!(
        "soak: {minutes} min, 8 clients; requests by status: {}",
        counts.join(", ")
    );
    println!(
        "soak: resident memory {at_warm:.1} MiB after the warm-up ({warm:.0} s), {end:.1} MiB at the end: \
         {growth:+.2}% (goal under 5%; means over 10 s)"
    );
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let csv: String = samples
        .iter()
        .map(|(t, m)| format!("{t:.1},{m:.2}\n"))
        .collect();
    std::fs::write(
        docs.join("soak.csv"),
        format!("seconds,resident_mib\n{csv}"),
    )
    .unwrap();
    plot(&samples, warm, &docs.join("soak.png"));
    println!("soak: the curve is in docs/soak.csv and docs/soak.png");
}
