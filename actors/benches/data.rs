//! `make bench`: the streaming data path, after PyTorch DataLoader's worker scaling. Two figures:
//!
//! - images read, decoded and preprocessed per second through the data workers (1, 2 and 4 workers,
//!   ratios against 1 in the same run), from a webdataset shard of 256×256 JPEGs;
//! - the share of `deem train`'s time the trainer waits for data, at `make run`'s stage I recipe (the
//!   tiny config on a synthetic world's MMC4 + pairs, pipelined over the embedded CPU topology), with
//!   the default `train.data_workers` (goal: under 2%).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use deem::config::DeemConfig;
use deem::data::mixer::Mixer;
use deem_actors::cli::prefetch::Prefetcher;
use deem_actors::cli::train_data::Batches;

fn tiny() -> DeemConfig {
    toml::from_str(include_str!("../../configs/tiny.toml")).unwrap()
}

/// A webdataset shard of `n` 256×256 JPEGs (smooth colour fields with noise, as photos decode).
fn shard(path: &Path, n: usize) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut s = 7u64;
    for i in 0..n {
        let img = image::RgbImage::from_fn(256, 256, |x, y| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = (s >> 59) as u8;
            image::Rgb([
                (x as u8).wrapping_add(noise),
                (y as u8).wrapping_add(i as u8),
                ((x + y) as u8) ^ noise,
            ])
        });
        let mut jpg = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        for (name, data) in [
            (format!("{i:06}.jpg"), jpg),
            (
                format!("{i:06}.txt"),
                format!("a photo number {i}").into_bytes(),
            ),
        ] {
            deem::data::synth::append_member(&mut b, &name, &data).unwrap();
        }
    }
    b.finish().unwrap();
}

/// Images per second through `workers` data workers over `batches` batches.
fn images_per_second(m: &Arc<dyn Batches>, rows: usize, workers: usize, batches: u64) -> f64 {
    let mut p = Prefetcher::new(m.clone(), 0..rows, workers, 8);
    let started = Instant::now();
    let mut images = 0;
    for k in 0..batches {
        images += p.get(k).unwrap().batch.pixels.size()[0];
    }
    images as f64 / started.elapsed().as_secs_f64()
}

fn decode_throughput(dir: &Path) {
    let tar = dir.join("photos.tar");
    shard(&tar, 600);
    let c = tiny();
    let tok = Arc::new(deem::text::tokenizer::load_tokenizer(None, None, &c).unwrap());
    let mut m = Mixer::new(&c, 3);
    let (pairs, _) = deem::data::stream::open_pairs_tar(&tar).unwrap();
    m.add_stream("photos", 1.0, Arc::new(pairs), tok, "");
    let m: Arc<dyn Batches> = Arc::new(m);
    let rows = c.train.batch_size as usize;
    let base = images_per_second(&m, rows, 1, 12);
    println!("data workers: images decoded and preprocessed per second (256×256 JPEG → 64×64)");
    println!("  1 worker : {base:8.1} images/s  (1.00×)");
    for w in [2, 4] {
        let r = images_per_second(&m, rows, w, 12);
        println!("  {w} workers: {r:8.1} images/s  ({:.2}×)", r / base);
    }
}

fn wait_share(dir: &Path) {
    let data = dir.join("world");
    let o = deem::data::synth::SynthOptions {
        seed: 0,
        size: 64,
        pairs: 200,
        documents: 100,
        instructions: 0,
        max_turns: 1,
        regions: 0,
        text_scenes: 0,
        colour_questions: 0,
        label_questions: 0,
        shape_twins: 0,
        eval_per_split: 0,
    };
    deem::data::synth::synthesize(&data, &o).unwrap();
    let cfg = deem_actors::settings::load(&deem_actors::settings::Layers {
        base: deem_actors::settings::BaseFile::Embedded {
            name: deem_actors::settings::EMBEDDED_TINY_NAME,
            text: deem_actors::settings::EMBEDDED_TINY,
        },
        env: vec![],
        overrides: vec!["train.checkpoint_every=0".into()],
    })
    .unwrap();
    let topo = deem_actors::runtime::topology::Topology::parse(
        deem_actors::runtime::topology::EMBEDDED_CPU,
        "cpu.toml",
        &cfg.config,
        0,
    )
    .unwrap();
    let job = deem_actors::cli::train::TrainJob {
        run_dir: dir.join("run"),
        steps: Some(12),
        mode: deem_actors::cli::train::Mode::Pipeline(topo),
        progress: false,
        resume: false,
        data: Some(data),
        init_from: None,
        pretrained: vec![],
        stop_at: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = deem_actors::runtime::metrics::Metrics::new();
    let started = Instant::now();
    deem_actors::cli::train::run_job(&job, &cfg, &metrics, &rt).unwrap();
    let total = started.elapsed().as_secs_f64();
    let waited = metrics.data.wait_seconds.get();
    println!(
        "make run's stage I recipe, {} data workers: the trainer waited {waited:.2} s of {total:.1} s \
         ({:.2}% of the run; goal < 2%)",
        cfg.config.train.data_workers,
        100.0 * waited / total
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("deem-bench-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    decode_throughput(&dir);
    wait_share(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}
