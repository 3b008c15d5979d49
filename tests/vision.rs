//! Vision encoder (timm ConvNeXt under open_clip names + DEEM adapters) and resampler (HF
//! Blip2QFormerModel + DEEM projections) parity with the references in tests/fixtures/generate.py
//! (torch 2.13.0, transformers 5.24.0, timm 1.0.31), and CLIP preprocessing.

mod common;
use common::{fixture, max_diff, read};

use deem::checkpoint::Checkpoint;
use deem::config::{HeadProj, ResamplerConfig, VisionConfig};
use deem::models::resampler::Resampler;
use deem::models::vision::VisionEncoder;
use tch::{nn, Device, Kind, Tensor};

/// fp32 parity bound against the reference libraries.
const TOL: f64 = 1e-4;

/// The sizes generate.py uses (VISION / RESAMPLER there).
pub fn vision_cfg() -> VisionConfig {
    VisionConfig {
        image_size: 64,
        in_channels: 3,
        patch_size: 4,
        depths: vec![1, 1, 2, 1],
        dims: vec![8, 16, 24, 32],
        embed_dim: 24,
        adapter_width: 24,
        mask_aware: false,
        head_proj: HeadProj::Linear,
    }
}

pub fn resampler_cfg() -> ResamplerConfig {
    ResamplerConfig {
        num_query_tokens: 77,
        hidden_size: 16,
        num_hidden_layers: 3,
        num_attention_heads: 2,
        intermediate_size: 32,
        cross_attention_frequency: 2,
        encoder_hidden_size: 24,
        layer_norm_eps: 1e-12,
    }
}

#[test]
fn convnext_and_adapters_match_timm() {
    let dir = fixture("vision");
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = VisionEncoder::new(&(vs.root() / "visual"), &vision_cfg());
    Checkpoint::open(&dir)
        .unwrap()
        .load_into(&vs, &VisionEncoder::load_spec())
        .unwrap();
    let out = tch::no_grad(|| enc.forward(&read(&dir.join("inputs.safetensors"), "pixel_values")));
    let expected = dir.join("expected.safetensors");
    assert_eq!(
        out.tokens.size(),
        vec![2, 1 + 4 * 4, 24],
        "pooled token + the 4×4 third-stage map at 64 px"
    );
    let mut worst = max_diff(&out.tokens, &read(&expected, "tokens"));
    for (i, m) in out.multiscale.iter().enumerate() {
        worst = worst.max(max_diff(m, &read(&expected, &format!("multiscale_{i}"))));
    }
    eprintln!("vision: max |deem - timm/open_clip reference| = {worst:.3e}");
    // Same libtorch kernels in the same order can agree bit for bit; make sure the values are real.
    assert!(out.tokens.abs().max().double_value(&[]) > 0.1);
    let fresh = nn::VarStore::new(Device::Cpu);
    let untrained = VisionEncoder::new(&(fresh.root() / "visual"), &vision_cfg());
    let other =
        tch::no_grad(|| untrained.forward(&read(&dir.join("inputs.safetensors"), "pixel_values")));
    assert!(
        max_diff(&other.tokens, &out.tokens) > 0.1,
        "the loaded weights matter"
    );
    assert!(worst < TOL);
}

/// Real open_clip 3.3.0 CLIP checkpoints (its TimmModel around a timm ConvNeXt, text tower included),
/// with each projection head open_clip's ConvNeXt configs use: `encode_image` is what `embed` computes.
#[test]
fn open_clip_checkpoints_load_and_embed_as_open_clip_does() {
    for (name, head) in [
        ("open_clip_linear", HeadProj::Linear),
        ("open_clip_mlp", HeadProj::Mlp),
    ] {
        let dir = fixture(name);
        let cfg = VisionConfig {
            head_proj: head,
            ..vision_cfg()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = VisionEncoder::new(&(vs.root() / "visual"), &cfg);
        let numel: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(
            deem::params::vision(&cfg),
            numel,
            "{name}: the parameter count"
        );
        Checkpoint::open(&dir)
            .unwrap()
            .load_into(&vs, &VisionEncoder::load_spec())
            .unwrap();
        let px = read(&dir.join("inputs.safetensors"), "pixel_values");
        let got = tch::no_grad(|| enc.embed(&px));
        let expected = read(&dir.join("expected.safetensors"), "embedding");
        let d = max_diff(&got, &expected);
        eprintln!("{name}: max |embed - open_clip encode_image| = {d:.3e}");
        assert!(expected.abs().max().double_value(&[]) > 0.1, "{name}");
        assert!(d < TOL, "{name}: {d:.3e}");
    }
    // The head of the file must be the configured one: a linear-head encoder names what differs.
    let vs = nn::VarStore::new(Device::Cpu);
    let _enc = VisionEncoder::new(&(vs.root() / "visual"), &vision_cfg());
    let err = Checkpoint::open(&fixture("open_clip_mlp"))
        .unwrap()
        .load_into(&vs, &VisionEncoder::load_spec())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("visual.head.proj.weight") && err.contains("visual.head.mlp.fc1.weight"),
        "{err}"
    );
}

#[test]
fn plain_open_clip_checkpoints_load_without_adapters() {
    // Drop DEEM's adapters and add a text tower: the encoder loads, the text keys are not its business.
    let src = Checkpoint::open(&fixture("vision")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = src
        .names()
        .filter(|n| !n.starts_with("visual.adapter_"))
        .map(|n| (n.to_string(), src.tensor(n).unwrap().unwrap()))
        .collect();
    tensors.push((
        "transformer.resblocks.0.attn.in_proj_weight".into(),
        Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)),
    ));
    tensors.push((
        "logit_scale".into(),
        Tensor::zeros([], (Kind::Float, Device::Cpu)),
    ));
    let dir = std::env::temp_dir().join(format!("deem-vision-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("open_clip_model.safetensors");
    deem::checkpoint::save(&path, &tensors).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _enc = VisionEncoder::new(&(vs.root() / "visual"), &vision_cfg());
    Checkpoint::open(&path)
        .unwrap()
        .load_into(&vs, &VisionEncoder::load_spec())
        .unwrap();
}

#[test]
fn resampler_matches_blip2_qformer() {
    let dir = fixture("resampler");
    let vs = nn::VarStore::new(Device::Cpu);
    let r = Resampler::new(&(vs.root() / "visual_tokenizer"), &resampler_cfg(), 32, 20);
    Checkpoint::open(&dir)
        .unwrap()
        .load_into(&vs, &Resampler::load_spec())
        .unwrap();
    let out =
        tch::no_grad(|| r.forward(&read(&dir.join("inputs.safetensors"), "image_tokens"), None));
    let expected = dir.join("expected.safetensors");
    let d = max_diff(&out.visual_tokens, &read(&expected, "visual_tokens")).max(max_diff(
        &out.csr_condition,
        &read(&expected, "csr_condition"),
    ));
    eprintln!("resampler: max |deem - transformers Blip2QFormerModel reference| = {d:.3e}");
    assert_eq!(out.visual_tokens.size(), vec![2, 77, 32]);
    assert_eq!(out.csr_condition.size(), vec![2, 77, 20]);
    assert!(d < TOL);
}

#[test]
fn encoder_feeds_resampler_end_to_end() {
    // The fixture's resampler input is the fixture encoder's output: chaining the two reproduces it.
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = VisionEncoder::new(&(vs.root() / "visual"), &vision_cfg());
    Checkpoint::open(&fixture("vision"))
        .unwrap()
        .load_into(&vs, &VisionEncoder::load_spec())
        .unwrap();
    let tokens = tch::no_grad(|| {
        enc.forward(&read(&fixture("vision/inputs.safetensors"), "pixel_values"))
            .tokens
    });
    assert!(
        max_diff(
            &tokens,
            &read(&fixture("resampler/inputs.safetensors"), "image_tokens")
        ) < TOL
    );
}

#[test]
fn preprocessing_resizes_crops_and_normalises() {
    // A 40×20 image: left half red, right half blue. Resized to 64 on the short side → 128×64, the
    // centre crop is 64×64 with red on the left 32 columns and blue on the right.
    let img = image::RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    });
    let t = deem::models::vision::preprocess(&img, 64);
    assert_eq!(t.size(), vec![3, 64, 64]);
    let at = |c: i64, y: i64, x: i64| t.double_value(&[c, y, x]);
    let norm = |v: f64, c: usize| {
        (v - deem::models::vision::CLIP_MEAN[c]) / deem::models::vision::CLIP_STD[c]
    };
    assert!((at(0, 10, 5) - norm(1.0, 0)).abs() < 1e-5);
    assert!((at(2, 10, 5) - norm(0.0, 2)).abs() < 1e-5);
    assert!((at(0, 50, 60) - norm(0.0, 0)).abs() < 1e-5);
    assert!((at(2, 50, 60) - norm(1.0, 2)).abs() < 1e-5);
}

/// A real photograph (matplotlib's grace_hopper.jpg, cropped to 141 × 120 and 120 × 141 PNGs) becomes
/// exactly the pixels open_clip's evaluation transform gives (torchvision's Resize + CenterCrop on the
/// PIL image, written before normalisation as 8-bit PNGs by tests/fixtures/generate.py), shrunk and
/// enlarged; crop offsets of 5.5 and 12.5 round as Python rounds. The JPEG itself differs only by its
/// decoder (the image crate's, not libjpeg-turbo's): a few levels.
#[test]
fn real_photos_preprocess_as_open_clip_does() {
    let dir = fixture("photo");
    let pixels = |name: &str, size: u32| {
        let img = image::open(dir.join(name)).unwrap().to_rgb8();
        deem::models::vision::unit_pixels(&img, size) * 255.0
    };
    let expected = |name: &str| {
        let img = image::open(dir.join(name)).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        deem::models::vision::unit_pixels(&img, w.min(h)) * 255.0
    };
    assert_eq!(
        deem::models::vision::square_crop(141, 120, 64),
        (75, 64, 6, 0)
    );
    assert_eq!(
        deem::models::vision::square_crop(141, 120, 144),
        (169, 144, 12, 0)
    );
    assert_eq!(
        deem::models::vision::square_crop(120, 141, 64),
        (64, 75, 0, 6)
    );
    for kind in ["landscape", "portrait"] {
        for size in [64, 144] {
            let got = pixels(&format!("{kind}.png"), size);
            let want = expected(&format!("{kind}_{size}.png"));
            assert_eq!(got.size(), vec![3, size as i64, size as i64]);
            let d = max_diff(&got, &want);
            assert!(d < 1e-3, "{kind} at {size} px: {d} levels off");
        }
    }
    let got = pixels("grace_hopper.jpg", 64);
    let want = expected("grace_hopper_64.png");
    let d = (&got - &want).abs();
    let (max, mean) = (
        d.max().double_value(&[]),
        d.mean(Kind::Float).double_value(&[]),
    );
    eprintln!("grace_hopper.jpg at 64 px: max {max} levels, mean {mean:.3} (decoders differ)");
    assert!(max <= 4.0 && mean < 0.5, "max {max}, mean {mean}");
}

#[test]
fn preprocessing_reports_undecodable_files() {
    let p = std::env::temp_dir().join(format!("deem-not-an-image-{}.png", std::process::id()));
    std::fs::write(&p, b"not a png").unwrap();
    let err = deem::models::vision::preprocess_file(&p, 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: cannot decode the image: ", p.display())),
        "{err}"
    );
}

fn loaded_encoder(vs: &nn::VarStore) -> VisionEncoder {
    let enc = VisionEncoder::new(&(vs.root() / "visual"), &vision_cfg());
    Checkpoint::open(&fixture("vision"))
        .unwrap()
        .load_into(vs, &VisionEncoder::load_spec())
        .unwrap();
    enc
}

#[test]
fn mask_extractor_with_an_all_ones_mask_is_the_plain_encoder_and_mean_pools() {
    use deem::models::region::MaskExtractor;
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = loaded_encoder(&vs);
    let ext = MaskExtractor::new(&(vs.root() / "visual_tokenizer"), 4, 24);
    let px = read(&fixture("vision/inputs.safetensors"), "pixel_values");
    let (v, m) = tch::no_grad(|| {
        let v = enc.forward(&px);
        let m = ext.forward(
            &v,
            &Tensor::ones([2, 1, 64, 64], (Kind::Float, Device::Cpu)),
        );
        (v, m)
    });
    assert_eq!(max_diff(&m.tokens, &v.tokens), 0.0);
    for (a, b) in m.multiscale.iter().zip(&v.multiscale) {
        assert_eq!(max_diff(a, b), 0.0);
    }
    assert_eq!(m.region_tokens.size(), vec![2, 5, 24]);
    // The defined reference: pooled token s = mask_pool.s(mean of map s); shape token = MLP(ones).
    let vars = vs.variables();
    let lin = |name: &str, x: &Tensor| {
        x.matmul(&vars[&format!("{name}.weight")].tr()) + &vars[&format!("{name}.bias")]
    };
    tch::no_grad(|| {
        for s in 0..4 {
            let mean = v.multiscale[s].mean_dim(&[2i64, 3][..], false, Kind::Float);
            let want = lin(&format!("visual_tokenizer.mask_pool.{s}"), &mean);
            assert!(
                max_diff(&m.region_tokens.select(1, s as i64), &want) < 1e-5,
                "scale {s}"
            );
        }
        let ones = Tensor::ones([2, 112 * 112], (Kind::Float, Device::Cpu));
        let h = lin("visual_tokenizer.mask_shape.fc1", &ones).gelu("none");
        let h = lin("visual_tokenizer.mask_shape.fc2", &h).gelu("none");
        let want = lin("visual_tokenizer.mask_shape.fc3", &h);
        assert!(max_diff(&m.region_tokens.select(1, 4), &want) < 1e-5);
    });
}

#[test]
fn a_half_mask_zeroes_the_other_half_and_an_empty_mask_stays_finite() {
    use deem::models::region::MaskExtractor;
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = loaded_encoder(&vs);
    let ext = MaskExtractor::new(&(vs.root() / "visual_tokenizer"), 4, 24);
    let px = read(&fixture("vision/inputs.safetensors"), "pixel_values");
    let left = Tensor::cat(
        &[
            Tensor::ones([2, 1, 64, 32], (Kind::Float, Device::Cpu)),
            Tensor::zeros([2, 1, 64, 32], (Kind::Float, Device::Cpu)),
        ],
        3,
    );
    let (v, m, empty) = tch::no_grad(|| {
        let v = enc.forward(&px);
        let m = ext.forward(&v, &left);
        let empty = ext.forward(
            &v,
            &Tensor::zeros([2, 1, 64, 64], (Kind::Float, Device::Cpu)),
        );
        (v, m, empty)
    });
    // Stage 2 map is 4×4: columns 0-1 kept, 2-3 zeroed.
    let s2 = &m.multiscale[2];
    assert_eq!(
        max_diff(&s2.narrow(3, 0, 2), &v.multiscale[2].narrow(3, 0, 2)),
        0.0
    );
    assert_eq!(s2.narrow(3, 2, 2).abs().max().double_value(&[]), 0.0);
    assert!(bool::try_from(empty.region_tokens.isfinite().all()).unwrap());
    // Region tokens flow into the resampler as a prefix.
    let rs = nn::VarStore::new(Device::Cpu);
    let r = Resampler::new(&(rs.root() / "visual_tokenizer"), &resampler_cfg(), 32, 20);
    let (plain, with_region) = tch::no_grad(|| {
        (
            r.forward(&m.tokens, None),
            r.forward(&m.tokens, Some(&m.region_tokens)),
        )
    });
    assert_eq!(with_region.visual_tokens.size(), vec![2, 77, 32]);
    assert!(max_diff(&plain.visual_tokens, &with_region.visual_tokens) > 1e-4);
}
