//! Streaming training data: sources opened lazily give the in-memory readers' batches; a data-parallel
//! rank decodes only its rows; the data workers give the same batches whatever their number and
//! after a resume; a 20 000-image webdataset trains in the memory of a 200-image one.

mod common;
#[path = "common/runtime.rs"]
mod rt;
#[path = "common/synth.rs"]
mod synth_helpers;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deem::config::DeemConfig;
use deem::data::mixer::Mixer;
use deem::data::{readers, stream};
use deem_actors::cli::prefetch::Prefetcher;
use deem_actors::cli::train_data::Batches;

/// The tiny config with a context long enough that no synthetic sample is dropped as too long (the
/// in-memory mixer drops those when it reads them, the streaming one when a batch draws them).
fn cfg() -> DeemConfig {
    let mut c = rt::embedded_tiny().config;
    c.train.context_length = 2048;
    c.train.batch_size = 4;
    c
}

fn world(name: &str) -> PathBuf {
    let dir = common::scratch(name);
    let o = deem::data::synth::SynthOptions {
        pairs: 12,
        documents: 8,
        instructions: 8,
        ..synth_helpers::small(3)
    };
    deem::data::synth::synthesize(&dir, &o).unwrap();
    dir
}

fn tokenizer(c: &DeemConfig, dir: &Path) -> Arc<deem::text::tokenizer::DeemTokenizer> {
    Arc::new(deem::text::tokenizer::load_tokenizer(None, Some(dir), c).unwrap())
}

/// The same files read whole and streamed, in the same mix.
fn mixers(c: &DeemConfig, dir: &Path) -> (Mixer, Mixer) {
    let tok = tokenizer(c, dir);
    let system = c.serve.system_prompt.as_str();
    let mut eager = Mixer::new(c, 11);
    let docs =
        readers::read_mmc4(&dir.join("mmc4.jsonl"), None, &c.data.mmc4, c.train.seed).unwrap();
    eager
        .add_documents("mmc4", 2.0, &docs.records, &tok)
        .unwrap();
    let pairs = readers::read_pairs_jsonl(&dir.join("pairs.jsonl"), None).unwrap();
    eager.add_pairs("pairs", 1.0, &pairs.records, &tok).unwrap();
    let tar = readers::read_pairs_tar(&dir.join("pairs-000000.tar"), None).unwrap();
    eager.add_pairs("tar", 1.0, &tar.records, &tok).unwrap();
    let convs = readers::read_llava(&dir.join("llava.json"), None).unwrap();
    eager
        .add_conversations("llava", 1.0, &convs.records, system, &tok)
        .unwrap();
    assert_eq!(eager.too_long, 0);

    let mut streamed = Mixer::new(c, 11);
    let (docs, r) =
        stream::open_mmc4(&dir.join("mmc4.jsonl"), None, &c.data.mmc4, c.train.seed).unwrap();
    assert_eq!(r.records.len(), eager.sources[0].len());
    streamed.add_stream("mmc4", 2.0, Arc::new(docs), tok.clone(), system);
    let (pairs, _) = stream::open_pairs_jsonl(&dir.join("pairs.jsonl"), None).unwrap();
    streamed.add_stream("pairs", 1.0, Arc::new(pairs), tok.clone(), system);
    let (tar, _) = stream::open_pairs_tar(&dir.join("pairs-000000.tar")).unwrap();
    streamed.add_stream("tar", 1.0, Arc::new(tar), tok.clone(), system);
    let (convs, _) = stream::open_llava(&dir.join("llava.json"), None).unwrap();
    streamed.add_stream("llava", 1.0, Arc::new(convs), tok, system);
    (eager, streamed)
}

fn same(a: &deem::models::deem::Batch, b: &deem::models::deem::Batch) -> bool {
    a.input_ids.equal(&b.input_ids)
        && a.pixels.equal(&b.pixels)
        && a.loss_mask
            .as_ref()
            .unwrap()
            .equal(b.loss_mask.as_ref().unwrap())
}

#[test]
fn streamed_sources_give_the_in_memory_readers_batches() {
    let c = cfg();
    let dir = world("stream-same");
    let (eager, streamed) = mixers(&c, &dir);
    for (e, s) in eager.sources.iter().zip(&streamed.sources) {
        assert_eq!(e.len(), s.len(), "{}", e.name);
    }
    for k in 0..6 {
        let (a, ca) = eager.batch_with_counts(k).unwrap();
        let (b, cb) = streamed.batch_with_counts(k).unwrap();
        assert_eq!(ca, cb, "batch {k}");
        assert!(a.pixels.size()[0] > 0);
        assert!(same(&a, &b), "batch {k}");
    }
    let read = streamed
        .stats
        .samples
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(read > 0);
}

/// MMC4 documents whose images sit in a tar shard (under the names the documents give) stream the
/// same batches as with the images in a folder; a name the shard lacks is a bad record.
#[test]
fn mmc4_images_in_a_tar_shard_give_the_folders_batches() {
    let c = cfg();
    let dir = world("stream-mmc4-tar");
    let file = dir.join("mmc4.jsonl");
    let mut names = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(&file).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for i in v["image_info"].as_array().unwrap() {
            names.insert(i["image_name"].as_str().unwrap().to_string());
        }
    }
    let shard = dir.join("mmc4-images.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&shard).unwrap());
    for n in names.iter().skip(1) {
        b.append_path_with_name(dir.join(n), n).unwrap();
    }
    b.finish().unwrap();
    let tok = tokenizer(&c, &dir);
    let mix = |images: Option<&Path>| {
        let (docs, r) = stream::open_mmc4(&file, images, &c.data.mmc4, c.train.seed).unwrap();
        let mut m = Mixer::new(&c, 5);
        m.add_stream("mmc4", 1.0, Arc::new(docs), tok.clone(), "");
        (m, r)
    };
    let (folder, rf) = mix(None);
    let (tarred, rt) = mix(Some(&shard));
    // The one image left out of the shard makes its document bad, named by its line.
    assert!(rf.bad.is_empty());
    assert_eq!(rt.bad.len(), 1, "{:?}", rt.bad);
    let first = names.iter().next().unwrap();
    assert_eq!(
        rt.bad[0].reason,
        format!("missing image {}:{first}", shard.display())
    );
    // Without that document, the tar shard's batches are the folder's on the same documents.
    let kept: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| !l.contains(first.as_str()))
        .map(String::from)
        .collect();
    let pruned = dir.join("mmc4-pruned.jsonl");
    std::fs::write(&pruned, kept.join("\n") + "\n").unwrap();
    let (docs, _) = stream::open_mmc4(&pruned, Some(&dir), &c.data.mmc4, c.train.seed).unwrap();
    let mut on_disk = Mixer::new(&c, 5);
    on_disk.add_stream("mmc4", 1.0, Arc::new(docs), tok.clone(), "");
    assert_eq!(on_disk.sources[0].len(), tarred.sources[0].len());
    assert_eq!(folder.sources[0].len(), tarred.sources[0].len() + 1);
    for k in 0..4 {
        assert!(
            same(&on_disk.batch(k).unwrap(), &tarred.batch(k).unwrap()),
            "batch {k}"
        );
    }
}

#[test]
fn a_rank_decodes_only_its_rows_and_the_ranks_make_the_global_batch() {
    let c = cfg();
    let dir = world("stream-ranks");
    let (_, m) = mixers(&c, &dir);
    let images = |b: &deem::models::deem::Batch| b.images_per_row(c.llm.vocab_size);
    for k in 0..4 {
        let full = m.batch(k).unwrap();
        let (a, _) = m.batch_rows(k, 0..2).unwrap();
        let (b, _) = m.batch_rows(k, 2..4).unwrap();
        assert!(full.input_ids.equal(&a.input_ids) && full.input_ids.equal(&b.input_ids));
        let per_row = images(&full);
        let split = per_row[..2].iter().sum::<i64>();
        let n = full.pixels.size()[0];
        assert!(split > 0 && split < n, "batch {k}: {per_row:?}");
        // Rank 0 decoded exactly the images of rows 0 and 1, rank 1 the rest; each left the
        // other's as zeros.
        let (head, tail) = (0..split, split..n);
        assert!(a
            .pixels
            .slice(0, head.start, head.end, 1)
            .equal(&full.pixels.slice(0, head.start, head.end, 1)));
        assert!(b
            .pixels
            .slice(0, tail.start, tail.end, 1)
            .equal(&full.pixels.slice(0, tail.start, tail.end, 1)));
        assert_eq!(
            a.pixels
                .slice(0, tail.start, tail.end, 1)
                .abs()
                .sum(tch::Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_eq!(
            b.pixels
                .slice(0, head.start, head.end, 1)
                .abs()
                .sum(tch::Kind::Float)
                .double_value(&[]),
            0.0
        );
    }
}

#[test]
fn data_workers_give_the_same_batches_in_order_and_after_a_resume() {
    let c = cfg();
    let dir = world("stream-workers");
    let (_, m) = mixers(&c, &dir);
    let m: Arc<dyn Batches> = Arc::new(m);
    let straight: Vec<_> = (0..8).map(|k| m.batch(k).unwrap()).collect();
    for workers in [0, 1, 2, 4] {
        let mut p = Prefetcher::new(m.clone(), 0..4, workers, 3);
        for (k, want) in straight.iter().enumerate() {
            let got = p.get(k as u64).unwrap().batch;
            assert!(same(&got, want), "{workers} workers, batch {k}");
        }
        // A resume at step 5 (or a restart back to 2) continues with the same batches.
        for start in [5u64, 2] {
            let got = p.get(start).unwrap().batch;
            assert!(
                same(&got, &straight[start as usize]),
                "{workers} workers, resumed at {start}"
            );
            let next = p.get(start + 1).unwrap().batch;
            assert!(same(&next, &straight[start as usize + 1]));
        }
    }
}

/// A webdataset shard of `n` 16×16 noise images (each its own PNG) with captions.
fn shard(path: &Path, n: usize) {
    let f = std::fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(f);
    let mut s = 1u64;
    for i in 0..n {
        let mut px = Vec::with_capacity(16 * 16 * 3);
        for _ in 0..16 * 16 * 3 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            px.push((s >> 56) as u8);
        }
        let img = image::RgbImage::from_raw(16, 16, px).unwrap();
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let caption = format!("a red star number {i}");
        for (name, data) in [
            (format!("{i:06}.png"), png),
            (format!("{i:06}.txt"), caption.into_bytes()),
        ] {
            deem::data::synth::append_member(&mut b, &name, &data).unwrap();
        }
    }
    b.finish().unwrap();
}

/// Peak resident memory of `deem train` on a shard of `n` images (the kernel's `ru_maxrss`).
// The child is reaped by `wait4`, which std's `Child` cannot see.
#[allow(clippy::zombie_processes)]
fn peak_rss(dir: &Path, n: usize) -> u64 {
    let data = dir.join(format!("data-{n}"));
    std::fs::create_dir_all(&data).unwrap();
    shard(&data.join("pairs.tar"), n);
    // The small fixture model, training on the shard alone.
    let config = dir.join("deem.toml");
    let text = std::fs::read_to_string(common::root().join("tests/fixtures/pretrained/deem.toml"))
        .unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[[train.sources]]\nfile = \"pairs.tar\"\nformat = \"pairs-tar\"\nweight = 1.0\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_deem"))
        .current_dir(common::root())
        .env("DEEM_LOG", "warn")
        .args([
            "train",
            "--quiet",
            "--single-process",
            "--steps",
            "4",
            "--config",
        ])
        .arg(&config)
        .args(["--set", "train.checkpoint_every=0", "--data"])
        .arg(&data)
        .arg("--run-dir")
        .arg(dir.join(format!("run-{n}")))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr to the end (it closes when the process exits), then the kernel's account of the
    // process: its peak resident set, exact, however briefly it was reached.
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let (mut status, mut usage) = (0i32, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child, writing into the two locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{n} images: {err}"
    );
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn twenty_thousand_images_train_in_the_memory_of_two_hundred() {
    let dir = common::scratch("stream-rss");
    let small = peak_rss(&dir, 200);
    let large = peak_rss(&dir, 20_000);
    eprintln!(
        "peak RSS of deem train: {:.1} MiB with 200 images, {:.1} MiB with 20 000",
        small as f64 / (1 << 20) as f64,
        large as f64 / (1 << 20) as f64
    );
    assert!(small > 0);
    assert!(
        (large as f64) < 1.10 * small as f64,
        "{large} bytes with 20 000 images, {small} with 200"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
