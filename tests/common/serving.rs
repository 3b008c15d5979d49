//! Helpers the serving tests share: the tiny config, the CPU topology, a running service, image data URLs,
//! engine requests and their replies.
#![allow(dead_code)]

use deem::config::DeemConfig;
use deem::text::tokenizer::load_tokenizer;
use deem_actors::runtime::metrics::Metrics;
use deem_actors::runtime::topology::Topology;
use deem_actors::serve::{openai, validation, Event, Service, Weights};
use serde_json::Value;

pub fn cfg() -> DeemConfig {
    let mut c: DeemConfig = toml::from_str(include_str!("../../configs/tiny.toml")).unwrap();
    c.serve.ddim_steps = 3;
    c.serve.csr_timesteps = vec![500];
    c
}

pub fn topology(c: &DeemConfig) -> Topology {
    Topology::load(&crate::common::root().join("topologies/cpu.toml"), c, 0).unwrap()
}

pub async fn service(c: DeemConfig, api_key: Option<&str>) -> Service {
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

pub fn url(s: &Service, path: &str) -> String {
    format!("http://{}{path}", s.addr)
}

/// A PNG of a red square on grey, as a data: URL.
pub fn png_data_url(side: u32) -> String {
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
pub async fn collect(rx: deem_actors::serve::events::Events) -> (String, usize, String) {
    let (text, images, finish) = collect_images(rx).await;
    (text, images.len(), finish)
}

/// [`collect`], with the drawn images' PNG bytes.
pub async fn collect_images(
    rx: deem_actors::serve::events::Events,
) -> (String, Vec<Vec<u8>>, String) {
    let (mut text, mut images) = (String::new(), Vec::new());
    while let Ok(ev) = rx.recv_async().await {
        match ev.unwrap_or_else(|message| panic!("generation failed: {message}")) {
            Event::Text(t) => text.push_str(&t),
            Event::Image(png) => images.push(png),
            Event::Csr(_) => {}
            Event::Done { finish_reason, .. } => return (text, images, finish_reason.into()),
        }
    }
    panic!("the stream ended without Done")
}

pub type Reply = (String, usize, String);

/// The engine request of an API body.
pub fn request_of(
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

/// The sum of a metric's samples (all its label sets, or the one named) in the service's `/metrics`.
pub async fn metric(client: &reqwest::Client, s: &Service, name: &str) -> f64 {
    let text = metrics_text(client, &url(s, "")).await;
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b' ')
                    || l.as_bytes().get(name.len()) == Some(&b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `/metrics` page of the service at `base` (`http://host:port`).
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
