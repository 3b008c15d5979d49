//! Diagnostic: how much of an image's main object an encoder's tokens hold. A ridge probe (closed form,
//! λ = 1, standardised features) on the flattened tokens of the ConvNeXt in ENCODER (open_clip names,
//! `deem pretrain encoder`'s `encoder.safetensors`) learns the main object's shape and colour from
//! N_TRAIN synthetic scenes and is scored on N_TEST others (chance: 1 / shapes, 1 / colours). When
//! ENCODER is a trained DEEM run (a checkpoint directory), it probes the run's encoder and also the
//! visual tokens its LLM reads (after the resampler and the projection into the LLM's width): where
//! the two differ, the shape was lost between the encoder and the LLM.
//!
//! cargo run --release -p deem-actors --example shape_probe -- CONFIG ENCODER|RUN [N_TRAIN N_TEST]

use deem::data::world::{self, Split};
use tch::{Kind, Tensor};

/// The flattened tokens DEEM's resampler reads, and open_clip's image embedding.
fn features(
    enc: &deem::models::vision::VisionEncoder,
    cfg: &deem::config::DeemConfig,
    scenes: &[world::Scene],
) -> (Tensor, Tensor) {
    let px: Vec<Tensor> = scenes
        .iter()
        .map(|s| deem::models::vision::unit_pixels(&s.render(), cfg.vision.image_size as u32))
        .collect();
    let (mut tokens, mut embeddings) = (Vec::new(), Vec::new());
    for chunk in px.chunks(64) {
        let x = deem::models::deem::clip_pixels(&Tensor::stack(chunk, 0), cfg.vision.image_size);
        tch::no_grad(|| {
            tokens.push(enc.forward(&x).tokens.flatten(1, -1));
            embeddings.push(enc.embed(&x));
        });
    }
    (Tensor::cat(&tokens, 0), Tensor::cat(&embeddings, 0))
}

fn one_hot(labels: &[usize], k: usize) -> Tensor {
    let idx = Tensor::from_slice(&labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
    idx.one_hot(k as i64).to_kind(Kind::Float)
}

/// Top-1 accuracy of a ridge regression onto one-hot labels.
fn probe(xtr: &Tensor, ytr: &[usize], xte: &Tensor, yte: &[usize], k: usize) -> f64 {
    let d = xtr.size()[1];
    let gram = xtr.transpose(0, 1).matmul(xtr) + Tensor::eye(d, (Kind::Float, tch::Device::Cpu));
    let w = Tensor::linalg_solve(&gram, &xtr.transpose(0, 1).matmul(&one_hot(ytr, k)), true);
    let pred = Vec::<i64>::try_from(xte.matmul(&w).argmax(1, false)).unwrap_or_default();
    pred.iter()
        .zip(yte)
        .filter(|(p, y)| **p as usize == **y)
        .count() as f64
        / yte.len() as f64
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 2 {
        anyhow::bail!("usage: shape_probe CONFIG ENCODER|RUN [N_TRAIN N_TEST]");
    }
    let cfg: deem::config::DeemConfig = toml::from_str(&std::fs::read_to_string(&a[0])?)?;
    let n_train: u64 = a.get(2).map_or(Ok(1500), |x| x.parse())?;
    let n_test: u64 = a.get(3).map_or(Ok(500), |x| x.parse())?;
    let path = std::path::Path::new(&a[1]);
    // Scenes from a stream no synth file uses.
    let scenes: Vec<world::Scene> = (0..n_train + n_test)
        .map(|k| world::scene(0x9b0be, Split::Id, k, 64))
        .collect();
    // A run directory: the whole model (its own encoder included); a file: the encoder alone.
    let run = if path.is_dir() {
        Some(deem_actors::cli::report::load_model(&cfg, path)?)
    } else {
        None
    };
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let standalone;
    let enc = match &run {
        Some((_, model)) => &model.vision.encoder,
        None => {
            standalone = deem::with_init_lock(Some(0), || {
                deem::models::vision::VisionEncoder::new(&(vs.root() / "visual"), &cfg.vision)
            });
            let mut spec = deem::models::vision::VisionEncoder::load_spec();
            // The DEEM adapters are not open_clip's: they keep their seeded values.
            spec.optional.push("visual.".into());
            deem::checkpoint::Checkpoint::open(path)?.load_into(&vs, &spec)?;
            &standalone
        }
    };
    let (tokens, embeddings) = features(enc, &cfg, &scenes);
    let mut rows = vec![
        ("encoder tokens".to_string(), tokens),
        ("image embedding".to_string(), embeddings),
    ];
    if let Some((_, model)) = &run {
        let mut visual = Vec::new();
        for chunk in scenes.chunks(64) {
            let px: Vec<Tensor> = chunk
                .iter()
                .map(|s| {
                    deem::models::vision::unit_pixels(&s.render(), cfg.vision.image_size as u32)
                })
                .collect();
            visual.push(tch::no_grad(|| {
                model.vision.forward(&Tensor::stack(&px, 0)).0
            }));
        }
        let visual = Tensor::cat(&visual, 0);
        // All the tokens together, their mean and three single tokens (first, middle, last): what one
        // attention read can get without mixing tokens, against what the 77 hold together.
        rows.push(("LLM's visual tokens".into(), visual.flatten(1, -1)));
        rows.push((
            "  their mean".into(),
            visual.mean_dim(1, false, Kind::Float),
        ));
        let q = visual.size()[1];
        for t in [0, q / 2, q - 1] {
            rows.push((format!("  token {t}"), visual.select(1, t)));
        }
    }
    let (tr, te) = scenes.split_at(n_train as usize);
    let shape = |s: &[world::Scene]| s.iter().map(|s| s.main().shape).collect::<Vec<_>>();
    let colour = |s: &[world::Scene]| s.iter().map(|s| s.main().colour).collect::<Vec<_>>();
    println!(
        "main object, {n_train} train / {n_test} test scenes (chance: shape {:.3}, colour {:.3})",
        1.0 / world::SHAPES.len() as f64,
        1.0 / world::COLOURS.len() as f64,
    );
    for (name, x) in rows {
        let (mean, std) = (
            x.mean_dim(0, true, Kind::Float),
            x.std_dim(0, true, true) + 1e-6,
        );
        let x = (x - mean) / std;
        let (xtr, xte) = (
            x.narrow(0, 0, n_train as i64),
            x.narrow(0, n_train as i64, n_test as i64),
        );
        println!(
            "  {name:<20} shape {:.3}  colour {:.3}",
            probe(&xtr, &shape(tr), &xte, &shape(te), world::SHAPES.len()),
            probe(&xtr, &colour(tr), &xte, &colour(te), world::COLOURS.len()),
        );
    }
    Ok(())
}
