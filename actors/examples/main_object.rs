//! Diagnostic: how often a checkpoint names an image's main object. For every image of the
//! ImageNet-style folders under ROOT (`{colour}_{shape}/NNN.png`), the model ranks every colour × shape
//! label by the log-likelihood of " A {label}." to "What is the main object in this image?"; prints the
//! top-1 accuracy of the label, of its colour and of its shape (chance: 1/100, 1/10, 1/10 of the labels).
//!
//! cargo run --release -p deem-actors --example main_object -- CONFIG CHECKPOINT DATA ROOT [PER_CLASS]

use std::path::Path;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 4 {
        anyhow::bail!("usage: main_object CONFIG CHECKPOINT DATA ROOT [PER_CLASS]");
    }
    let cfg: deem::config::DeemConfig = toml::from_str(&std::fs::read_to_string(&a[0])?)?;
    let tok = Arc::new(deem::text::tokenizer::load_tokenizer(
        None,
        Some(Path::new(&a[2])),
        &cfg,
    )?);
    let clf = deem_actors::cli::report::ModelClassifier::new(&cfg, Path::new(&a[1]), tok)?;
    let per_class: usize = a.get(4).map_or(Ok(2), |x| x.parse())?;
    let (mut n, mut label, mut colour, mut shape) = (0, 0, 0, 0);
    let mut classes: Vec<_> = std::fs::read_dir(&a[3])?.filter_map(|e| e.ok()).collect();
    classes.sort_by_key(|e| e.file_name());
    for class in classes.iter().filter(|e| e.path().is_dir()) {
        let truth = class.file_name().to_string_lossy().replace('_', " ");
        let mut images: Vec<_> = std::fs::read_dir(class.path())?
            .filter_map(|e| e.ok())
            .collect();
        images.sort_by_key(|e| e.file_name());
        for img in images.iter().take(per_class) {
            let best = clf.rank(&img.path())?.remove(0);
            let (bc, bs) = best.split_once(' ').unwrap_or((&best, ""));
            let (tc, ts) = truth.split_once(' ').unwrap_or((&truth, ""));
            n += 1;
            label += usize::from(best == truth);
            colour += usize::from(bc == tc);
            shape += usize::from(bs == ts);
        }
    }
    let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
    println!(
        "{}: {n} images, main object top-1 {:.1} %, colour {:.1} %, shape {:.1} %",
        a[3],
        pct(label),
        pct(colour),
        pct(shape)
    );
    Ok(())
}
