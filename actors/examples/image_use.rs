//! Diagnostic: does a checkpoint's LLM read the images? The mean next-token loss of training batches of
//! DATA with their own images, and with the images of the batch rotated by one (each row then sees
//! another row's images). Equal losses: the LLM ignores the visual tokens.
//!
//! cargo run --release -p deem-actors --example image_use -- CONFIG CHECKPOINT DATA [BATCHES]

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        anyhow::bail!("usage: image_use CONFIG CHECKPOINT DATA [BATCHES]");
    }
    let cfg: deem::config::DeemConfig = toml::from_str(&std::fs::read_to_string(&a[0])?)?;
    let (_vs, model) = deem_actors::cli::report::load_model(&cfg, Path::new(&a[1]))?;
    let batches = deem_actors::cli::train_data::dataset_batches(
        &cfg,
        Path::new(&a[2]),
        &deem_actors::runtime::metrics::Metrics::new(),
    )?;
    let n: u64 = a.get(3).map_or(Ok(20), |x| x.parse())?;
    let (mut own, mut rotated) = (0.0, 0.0);
    for i in 0..n {
        let b = batches.batch(10_000 + i).map_err(anyhow::Error::msg)?;
        let k = b.pixels.size()[0];
        let other = deem::models::deem::Batch {
            input_ids: b.input_ids.shallow_clone(),
            pixels: b.pixels.roll([1], [0]),
            loss_mask: b.loss_mask.as_ref().map(|m| m.shallow_clone()),
            masks: b.masks.as_ref().map(|m| m.roll([1], [0])),
        };
        let l = tch::no_grad(|| -> anyhow::Result<(f64, f64)> {
            Ok((
                model.losses(&b, 0, i, 0)?.ntp.double_value(&[]),
                model.losses(&other, 0, i, 0)?.ntp.double_value(&[]),
            ))
        })?;
        if i == 0 {
            let v = tch::no_grad(|| model.vision.forward(&b.pixels).0);
            let spread = (&v - v.mean_dim(0, true, v.kind())).abs().mean(v.kind());
            eprintln!(
                "visual tokens {:?}: mean |v| {:.4}, mean |v - mean over images| {:.4}; pixels std {:.4}",
                v.size(),
                v.abs().mean(v.kind()).double_value(&[]),
                spread.double_value(&[]),
                b.pixels.std(true).double_value(&[])
            );
        }
        own += l.0;
        rotated += l.1;
        eprintln!(
            "batch {i}: {k} images, ntp {:.4} own images, {:.4} rotated",
            l.0, l.1
        );
    }
    println!(
        "mean ntp over {n} batches: {:.4} with their own images, {:.4} with another row's",
        own / n as f64,
        rotated / n as f64
    );
    Ok(())
}
