//! The DEEM model's losses against their definitions, the stage rules (frozen parts, LR groups), the
//! reference trainer's determinism, and a tiny DEEM overfitting one batch.

use std::collections::BTreeMap;

use deem::config::{DeemConfig, Stage};
use deem::data::batches::SyntheticBatches;
use deem::models::deem::Batch;
use deem::models::losses::csr_timesteps;
use deem::rng::{ints, Purpose, Stream};
use deem::train::{group_of, lr_factor, Group, Trainer};
use tch::{Device, Kind, Tensor};

fn tiny(stage: Stage) -> DeemConfig {
    let mut cfg: DeemConfig = toml::from_str(include_str!("../configs/tiny.toml")).unwrap();
    cfg.train.stage = stage;
    cfg.train.warmup_steps = 0;
    // The paper's rule (a pretrained LLM frozen in stage I); the tiny recipe's from-scratch LLM is
    // checked on its own.
    cfg.train.train_llm_in_stage_one = false;
    cfg
}

fn rules(stage: Stage) -> deem::config::TrainConfig {
    tiny(stage).train
}

fn snapshot(t: &Trainer) -> BTreeMap<String, Tensor> {
    t.vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect()
}

fn changed(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    prefix: &str,
) -> (usize, usize) {
    let names: Vec<&String> = a.keys().filter(|k| k.starts_with(prefix)).collect();
    let moved = names.iter().filter(|k| a[**k] != b[**k]).count();
    (moved, names.len())
}

#[test]
fn ntp_loss_masks_pad_placeholders_bos_and_the_bos_soi_transition() {
    let cfg = tiny(Stage::III);
    let t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let m = &t.model;
    let (bos, pad, soi, hole) = (1i64, 0i64, 1024i64, 1025i64);
    // Targets (ids[1..]): soi after BOS (masked), hole (masked), 7 (kept), soi after 7 (kept: the model learns
    // when to draw), hole (masked), bos (masked), 9 (kept), pad (masked).
    let ids = Tensor::from_slice(&[bos, soi, hole, 7, soi, hole, bos, 9, pad]).view([1, 9]);
    let logits = Stream::new(0, 0, 0, Purpose::NipNoise).normal(&[1, 9, 1030]);
    let loss = deem::models::losses::ntp_loss(&logits, &ids, None, m.ids).double_value(&[]);
    let lp = logits.log_softmax(-1, Kind::Float);
    let kept = [(2i64, 7i64), (3, soi), (6, 9)]; // (position predicting, target)
    let want: f64 = kept
        .iter()
        .map(|&(p, tgt)| -lp.double_value(&[0, p, tgt]))
        .sum::<f64>()
        / kept.len() as f64;
    assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");

    // A loss mask keeps only the ids it marks, and never revives what the rules mask: id 7 (index 3)
    // and the placeholder at index 2 are marked, so only 7 counts.
    let mut keep = [false; 9];
    keep[2] = true;
    keep[3] = true;
    let mask = Tensor::from_slice(&keep).view([1, 9]);
    let loss = deem::models::losses::ntp_loss(&logits, &ids, Some(&mask), m.ids).double_value(&[]);
    let want = -lp.double_value(&[0, 2, 7]);
    assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
}

#[test]
fn csr_loss_is_the_diffusion_loss_of_the_encoders_own_condition() {
    let cfg = tiny(Stage::II);
    let t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let m = &t.model;
    let batch = SyntheticBatches::new(&cfg, 3).batch(0);
    let mb = &batch.split(2, m.ids.soi).unwrap()[1];
    let l = tch::no_grad(|| m.losses(mb, 11, 5, 1).unwrap());
    // By definition: t = round((u−500)·0.6+500) from the CSR stream, noise from its stream, condition
    // proj_i(resampler(encoder(x))), target ε.
    let want = tch::no_grad(|| {
        let cond = m.vision.forward(&mb.pixels).1;
        let d = &m.diffusion;
        let lat = d.latents(&mb.pixels);
        let noise = Stream::new(11, 5, 1, Purpose::CsrNoise).normal(&lat.size());
        let ts = csr_timesteps(
            &mut Stream::new(11, 5, 1, Purpose::CsrTimesteps),
            lat.size()[0] as usize,
        );
        assert!(ts.iter().all(|&x| (200..800).contains(&x)), "{ts:?}");
        let tt = ints(&ts);
        let pred =
            m.diffusion
                .unet
                .forward(&m.diffusion.ddpm.add_noise(&lat, &noise, &tt), &tt, &cond);
        (pred - noise).square().mean(Kind::Float).double_value(&[])
    });
    assert!((l.csr.double_value(&[]) - want).abs() < 1e-6);
    assert_eq!(l.nip.double_value(&[]), 0.0, "stage II has no NIP");
    let total = l.ntp.double_value(&[]) + 5.0 * want;
    assert!((l.total.double_value(&[]) - total).abs() < 1e-4);
}

#[test]
fn nip_loss_is_the_diffusion_loss_of_the_llm_context_condition() {
    let mut cfg = tiny(Stage::I);
    cfg.diffusion.condition.null_condition_prob = 0.5;
    let t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let m = &t.model;
    let batch = SyntheticBatches::new(&cfg, 4).batch(0);
    let l = tch::no_grad(|| m.losses(&batch, 13, 2, 0).unwrap());
    let want = tch::no_grad(|| {
        let visual = m.vision.forward(&batch.pixels).0;
        let embeds = deem::text::sequence::splice_images(
            &m.llm.embed(&batch.input_ids),
            &batch.input_ids,
            &visual,
            m.llm.soi_embedding().unwrap(),
            m.ids.soi,
            m.ids.sniffer,
        )
        .unwrap();
        let hidden = m.llm.norm(&m.llm.forward_layers(&embeds, 0, None));
        let (ctx, mask, index) =
            deem::models::losses::nip_inputs(&hidden, &batch.input_ids, m.ids).unwrap();
        // Every row has two images, both with text before them: all are drawn.
        assert_eq!(index, (0..batch.pixels.size()[0]).collect::<Vec<_>>());
        let k = index.len();
        let drop = Stream::new(13, 2, 0, Purpose::NullCondition).bernoulli(k, 0.5);
        assert!(
            drop.iter().any(|&d| d) && drop.iter().any(|&d| !d),
            "p = 0.5 drops some: {drop:?}"
        );
        let cond = m.diffusion.condition.forward(&ctx, &mask);
        let rows: Vec<Tensor> = (0..k)
            .map(|i| {
                if drop[i] {
                    m.diffusion.condition.null_condition.get(0)
                } else {
                    cond.get(i as i64)
                }
            })
            .collect();
        let cond = Tensor::stack(&rows, 0);
        let lat = m.diffusion.latents(&batch.pixels);
        let noise = Stream::new(13, 2, 0, Purpose::NipNoise).normal(&lat.size());
        let tt = ints(&Stream::new(13, 2, 0, Purpose::NipTimesteps).below(k, 1000));
        let pred =
            m.diffusion
                .unet
                .forward(&m.diffusion.ddpm.add_noise(&lat, &noise, &tt), &tt, &cond);
        (pred - noise).square().mean(Kind::Float).double_value(&[])
    });
    assert!(
        (l.nip.double_value(&[]) - want).abs() < 1e-6,
        "{} vs {want}",
        l.nip.double_value(&[])
    );
}

#[test]
fn nip_contexts_run_back_to_the_nearest_bos_and_skip_bare_images() {
    let cfg = tiny(Stage::I);
    let t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let m = &t.model;
    let (bos, soi) = (1i64, 1024i64);
    // Row 0: [BOS, SoI] → skipped; then text, BOS, 5, 6, SoI → context [SoI, 6, 5, BOS].
    let ids = Tensor::from_slice(&[bos, soi, 3, bos, 5, 6, soi, 4]).view([1, 8]);
    let hidden = Tensor::arange(8, (Kind::Float, Device::Cpu))
        .view([1, 8, 1])
        .expand([1, 8, 64], true);
    let (ctx, mask, index) = deem::models::losses::nip_inputs(&hidden, &ids, m.ids).unwrap();
    assert_eq!(
        index,
        vec![1],
        "the second image (index 1) is drawn; the first has only [BOS, SoI]"
    );
    let firsts: Vec<f32> = Vec::try_from(ctx.select(2, 0).reshape([-1])).unwrap();
    assert_eq!(firsts, vec![6.0, 5.0, 4.0, 3.0]);
    assert_eq!(
        Vec::<bool>::try_from(mask.reshape([-1])).unwrap(),
        vec![true; 4]
    );
}

#[test]
fn stage_rules_freeze_and_group_parameters() {
    assert_eq!(group_of(&rules(Stage::I), "unet.conv_in.weight"), None);
    assert_eq!(
        group_of(&rules(Stage::II), "vae.encoder.conv_in.weight"),
        None
    );
    let mut deem_recipe = rules(Stage::III);
    deem_recipe.train_lm_head = false;
    assert_eq!(
        group_of(&deem_recipe, "lm_head.weight"),
        None,
        "DEEM keeps the pretrained head frozen"
    );
    assert_eq!(
        group_of(&rules(Stage::III), "lm_head.weight"),
        Some(Group::Llm),
        "tiny trains its head"
    );
    assert_eq!(group_of(&rules(Stage::I), "lm_head.weight"), None);
    assert_eq!(
        group_of(&rules(Stage::I), "lm_head_new.weight"),
        Some(Group::Other)
    );
    assert_eq!(
        group_of(&rules(Stage::I), "model.layers.0.mlp.up_proj.weight"),
        None
    );
    assert_eq!(
        group_of(&rules(Stage::II), "model.layers.0.mlp.up_proj.weight"),
        Some(Group::Llm)
    );
    assert_eq!(
        group_of(&rules(Stage::I), "visual.trunk.stem.0.weight"),
        Some(Group::Encoder)
    );
    assert_eq!(
        group_of(&rules(Stage::II), "visual.trunk.stem.0.weight"),
        None
    );
    assert_eq!(
        group_of(&rules(Stage::I), "nip_condition.null_condition"),
        Some(Group::Encoder)
    );
    assert_eq!(
        group_of(&rules(Stage::I), "visual_tokenizer.proj_t.weight"),
        Some(Group::Other)
    );
    assert_eq!(
        group_of(&rules(Stage::I), "model.soi_embedding"),
        Some(Group::Other)
    );
    // A recipe whose LLM starts from scratch trains it (and its head) in stage I too.
    let mut scratch = rules(Stage::I);
    scratch.train_llm_in_stage_one = true;
    assert_eq!(
        group_of(&scratch, "model.layers.0.mlp.up_proj.weight"),
        Some(Group::Llm)
    );
    assert_eq!(group_of(&scratch, "lm_head.weight"), Some(Group::Llm));
    assert_eq!(group_of(&scratch, "unet.conv_in.weight"), None);
    // transformers' cosine-with-warm-up multipliers.
    assert_eq!(lr_factor(0, 10, 110), 0.0);
    assert_eq!(lr_factor(5, 10, 110), 0.5);
    assert_eq!(lr_factor(10, 10, 110), 1.0);
    assert!((lr_factor(60, 10, 110) - 0.5).abs() < 1e-12);
    assert!(lr_factor(110, 10, 110).abs() < 1e-12);
    // Past the end the LR stays at 0 instead of rising again.
    assert_eq!(lr_factor(160, 10, 110), 0.0);
}

#[test]
fn an_optimizer_step_moves_trainable_parts_at_their_lr_and_leaves_frozen_ones() {
    for stage in [Stage::I, Stage::II] {
        let mut cfg = tiny(stage);
        cfg.train.weight_decay = 0.0;
        let mut t = Trainer::new(&cfg, Device::Cpu).unwrap();
        let batch = SyntheticBatches::new(&cfg, 1).batch(0);
        let before = snapshot(&t);
        t.step(&batch).unwrap();
        let after = snapshot(&t);
        let mut frozen = vec!["unet.", "vae."];
        if stage == Stage::I {
            frozen.push("lm_head.");
        }
        for frozen in frozen {
            assert_eq!(
                changed(&before, &after, frozen).0,
                0,
                "{stage:?}: {frozen} moved"
            );
        }
        let (llm_moved, llm_all) = changed(&before, &after, "model.layers.");
        let (trunk_moved, _) = changed(&before, &after, "visual.trunk.");
        if stage == Stage::I {
            assert_eq!(llm_moved, 0);
            assert!(trunk_moved > 0);
            assert!(changed(&before, &after, "nip_condition.").0 > 0);
        } else {
            assert_eq!(llm_moved, llm_all);
            assert_eq!(trunk_moved, 0);
        }
        assert!(changed(&before, &after, "visual_tokenizer.").0 > 0);
        // Adam's first step moves a coordinate by lr·g/(|g| + ε) ≈ lr wherever |g| ≫ ε, whatever the clip
        // factor: the largest move in each group is its learning rate.
        let mut largest: BTreeMap<Group, f64> = BTreeMap::new();
        for p in &t.opt.params {
            let step = (&after[&p.name] - &before[&p.name])
                .abs()
                .max()
                .double_value(&[]);
            let e = largest.entry(p.group).or_insert(0.0);
            *e = e.max(step);
        }
        assert!(!largest.is_empty());
        for (g, step) in largest {
            let lr = g.lr(&cfg.train);
            // 1e-7: the f32 rounding of a parameter near 1.
            assert!(
                step <= lr + 1e-7 && step >= lr * 0.9,
                "{stage:?} {g:?}: largest move {step}, lr {lr}"
            );
        }
        assert!(
            t.opt
                .params
                .iter()
                .all(|p| group_of(&cfg.train, &p.name).is_some()),
            "no frozen parameter has optimizer state"
        );
    }
}

#[test]
fn the_reference_trainer_is_deterministic() {
    let cfg = tiny(Stage::I);
    let run = || {
        let mut t = Trainer::new(&cfg, Device::Cpu).unwrap();
        let data = SyntheticBatches::new(&cfg, 5);
        let reports: Vec<_> = (0..2).map(|i| t.step(&data.batch(i)).unwrap()).collect();
        (reports, snapshot(&t))
    };
    let (r1, w1) = run();
    let (r2, w2) = run();
    assert_eq!(r1, r2);
    assert!(w1.iter().all(|(k, v)| *v == w2[k]));
    assert!(
        r1[0].nip > 0.0 && r1[0].csr > 0.0 && r1[0].ntp > 0.0,
        "{:?}",
        r1[0]
    );
}

#[test]
fn tiny_deem_overfits_one_batch() {
    // Stage III (NTP, LLM trainable): the stage whose every loss term the model can drive down. In
    // stages I/II the diffusion terms run through the frozen UNet, which for the tiny config is random
    // (there is no pretrained tiny SD), so they cannot fall to 30%.
    let mut cfg = tiny(Stage::III);
    cfg.train.steps = 100;
    // 3× tiny's default LR: 100 steps on one batch then end far below the bound (1e-3 ends at 28%).
    cfg.train.lr = 3e-3;
    cfg.train.llm_lr = 3e-3;
    let mut t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let batch: Batch = SyntheticBatches::new(&cfg, 2).batch(0);
    let first = t.step(&batch).unwrap().total;
    let started = std::time::Instant::now();
    let mut last = first;
    for _ in 1..100 {
        last = t.step(&batch).unwrap().total;
    }
    eprintln!(
        "overfit: {first:.3} → {last:.3} in 99 steps, {:.1} ms/step",
        started.elapsed().as_secs_f64() * 1e3 / 99.0
    );
    assert!(last < 0.3 * first, "{first} → {last}");
}

/// Solid-colour images, captioned with their colour names, for contrastive pretraining.
fn colour_pairs(cfg: &DeemConfig) -> (Vec<Tensor>, Vec<Vec<i64>>) {
    let s = cfg.vision.image_size;
    deem::data::world::COLOURS
        .iter()
        .enumerate()
        .map(|(i, (_, rgb))| {
            let px = Tensor::from_slice(&rgb.map(|c| c as f32 / 255.0))
                .view([3, 1, 1])
                .expand([3, s, s], false)
                .contiguous();
            // One distinct id per colour, then EOS.
            (px, vec![10 + i as i64, cfg.llm.eos_token_id])
        })
        .unzip()
}

#[test]
fn contrastive_pretraining_aligns_images_with_their_captions() {
    let cfg = tiny(Stage::I);
    let (images, captions) = colour_pairs(&cfg);
    let o = deem::train::clip::ClipOptions {
        steps: 200,
        warmup_steps: 5,
        batch_size: images.len(),
        ..Default::default()
    };
    let mut reports = Vec::new();
    let weights =
        deem::train::clip::pretrain(&cfg, &images, &captions, &o, |r| reports.push(*r)).unwrap();
    assert_eq!(reports.len(), 200);
    let first = reports[..5].iter().map(|r| r.loss).sum::<f64>() / 5.0;
    let last = reports[195..].iter().map(|r| r.loss).sum::<f64>() / 5.0;
    assert!(last < 0.5 * first, "loss {first} → {last}");
    // Every CLIP weight comes back, under the names a CLIP for this configuration has.
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _shape = deem::train::clip::Clip::new(&vs.root(), &cfg, o.text_layers).unwrap();
    let model: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    assert_eq!(
        weights.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        model.keys().map(String::as_str).collect::<Vec<_>>()
    );
    for (name, t) in &weights {
        assert_eq!(model[name].size(), t.size(), "{name}");
    }
    let tower: Vec<&str> = weights
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| deem::train::clip::is_image_tower(n))
        .collect();
    assert!(
        tower.contains(&"visual.head.proj.weight") && tower.contains(&"visual.trunk.stem.0.weight")
    );
    assert!(!tower.iter().any(|n| n.starts_with("visual.adapter")));
    // Chance is 0.1. Not 1.0: a solid colour that is another one scaled in brightness looks the same after
    // the stem's per-position LayerNorm (brown and orange, say), so a few pairs stay confused.
    assert!(
        reports.last().unwrap().accuracy >= 0.6,
        "{:?}",
        reports.last()
    );
    // The reloaded CLIP retrieves each colour's caption from its image.
    let w: BTreeMap<String, Tensor> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let vs2 = tch::nn::VarStore::new(Device::Cpu);
    let clip = deem::train::clip::load(&vs2, &cfg, &w).unwrap();
    let caps: Vec<&[i64]> = captions.iter().map(Vec::as_slice).collect();
    let (ids, last) = deem::train::clip::pad_captions(&caps, cfg.llm.pad_token_id);
    let sim = tch::no_grad(|| {
        clip.image_embeddings(&Tensor::stack(&images, 0))
            .matmul(&clip.text_embeddings(&ids, &last).tr())
    });
    let found = sim
        .argmax(1, false)
        .eq_tensor(&Tensor::arange(10, tch::kind::INT64_CPU))
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(
        found >= 6,
        "{found} of 10 colours retrieve their own caption"
    );
    // A repeat run is the same run (batches and init from the seed).
    let again = deem::train::clip::pretrain(&cfg, &images, &captions, &o, |_| {}).unwrap();
    for ((a, x), (b, y)) in weights.iter().zip(&again) {
        assert_eq!(a, b);
        assert_eq!(x, y, "{a}");
    }
}

#[test]
fn contrastive_pretraining_rejects_unusable_pairs() {
    let cfg = tiny(Stage::I);
    let (images, mut captions) = colour_pairs(&cfg);
    let o = deem::train::clip::ClipOptions {
        steps: 1,
        ..Default::default()
    };
    let err = |i: &[Tensor], c: &[Vec<i64>]| {
        deem::train::clip::pretrain(&cfg, i, c, &o, |_| {})
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err(&images, &captions[..3]), "10 images but 3 captions");
    assert_eq!(
        err(&images[..1], &captions[..1]),
        "contrastive pretraining needs at least 2 image-caption pairs, found 1"
    );
    let grouped = deem::train::clip::ClipOptions {
        group: 3,
        ..o.clone()
    };
    assert_eq!(
        deem::train::clip::pretrain(&cfg, &images, &captions, &grouped, |_| {})
            .unwrap_err()
            .to_string(),
        "--group 3: the 10 pairs must split into groups of 3 and a batch (64) hold at least two"
    );
    captions[4].clear();
    assert_eq!(err(&images, &captions), "caption 4 has no ids");
}

/// Grouped contrastive batches take whole groups (a scene and its hard negatives together); ungrouped,
/// the sampler draws as it always did (so the shipped encoder stays reproducible).
#[test]
fn contrastive_batches_take_whole_groups() {
    use deem::rng::{Purpose, Stream};
    let o = deem::train::clip::ClipOptions {
        group: 2,
        batch_size: 8,
        ..Default::default()
    };
    for step in 0..20 {
        let p = deem::train::clip::batch_picks(&o, step, 100);
        assert_eq!(p.len(), 8);
        for pair in p.chunks(2) {
            assert_eq!((pair[0] % 2, pair[1]), (0, pair[0] + 1), "{p:?}");
        }
        assert!(p.iter().all(|&i| (0..100).contains(&i)));
    }
    let one = deem::train::clip::ClipOptions {
        batch_size: 8,
        ..Default::default()
    };
    for step in 0..5 {
        assert_eq!(
            deem::train::clip::batch_picks(&one, step, 100),
            Stream::new(one.seed, step, 1, Purpose::Data).below(8, 100)
        );
    }
}

#[test]
fn padded_captions_point_at_their_last_id() {
    let (ids, last) = deem::train::clip::pad_captions(&[&[5, 6, 2], &[7, 2]], 0);
    assert_eq!(ids, Tensor::from_slice(&[5i64, 6, 2, 7, 2, 0]).view([2, 3]));
    assert_eq!(last, Tensor::from_slice(&[2i64, 1]));
}

#[test]
fn decoder_pretraining_learns_to_reconstruct_and_scales_its_latents_as_sd() {
    let cfg = tiny(Stage::I);
    let (images, captions) = colour_pairs(&cfg);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let clip = deem::train::clip::Clip::new(&vs.root(), &cfg, 2).unwrap();
    let o = deem::train::sd::DecoderOptions {
        vae_steps: 60,
        unet_steps: 10,
        warmup_steps: 2,
        batch_size: 10,
        ..Default::default()
    };
    let empty = vec![cfg.llm.eos_token_id];
    let mut vae = Vec::new();
    let mut unet = Vec::new();
    let weights =
        deem::train::sd::pretrain(&cfg, &clip, &images, &captions, &empty, &o, |r| {
            match r.part {
                "vae" => vae.push(r.loss),
                _ => unet.push(r.loss),
            }
        })
        .unwrap();
    assert_eq!((vae.len(), unet.len()), (60, 10));
    assert!(
        vae[55..].iter().sum::<f64>() < 0.5 * vae[..5].iter().sum::<f64>(),
        "{vae:?}"
    );
    assert!(unet.iter().all(|l| l.is_finite()));
    // The weights are the DEEM model's UNet and VAE, name for name and shape for shape.
    let t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let model: BTreeMap<String, Tensor> =
        t.vs.variables()
            .into_iter()
            .filter(|(n, _)| n.starts_with("unet.") || n.starts_with("vae."))
            .collect();
    assert_eq!(weights.len(), model.len());
    for (name, w) in &weights {
        assert_eq!(model[name].size(), w.size(), "{name}");
    }
    // Loaded into DEEM, the scaled latents of the data have unit variance (SD's scaling-factor rule).
    tch::no_grad(|| {
        for (name, w) in &weights {
            model[name].shallow_clone().copy_(w);
        }
    });
    let lat = t.model.diffusion.latents(&Tensor::stack(&images, 0));
    let std = lat.std(true).double_value(&[]);
    assert!((std - 1.0).abs() < 1e-3, "{std}");
}

#[test]
fn decoder_pretraining_rejects_unusable_pairs() {
    let cfg = tiny(Stage::I);
    let (images, captions) = colour_pairs(&cfg);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let clip = deem::train::clip::Clip::new(&vs.root(), &cfg, 2).unwrap();
    let o = deem::train::sd::DecoderOptions::default();
    let run = |c: &[Vec<i64>], empty: &[i64]| {
        deem::train::sd::pretrain(&cfg, &clip, &images, c, empty, &o, |_| {})
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        run(&captions[..2], &[2]),
        "expected as many captions as images (at least one), found 10 images and 2 captions"
    );
    assert_eq!(
        run(&captions, &[]),
        "every caption, the empty one too, needs at least its EOS id"
    );
}

/// Masks `[n, 1, S, S]` for the images of `b`: image `j` keeps its top `(j mod 3 + 1) / 4` rows.
fn top_rows_masks(b: &Batch) -> Tensor {
    let (n, s) = (b.pixels.size()[0], b.pixels.size()[2]);
    let m = Tensor::zeros([n, 1, s, s], (Kind::Float, Device::Cpu));
    for j in 0..n {
        let rows = s * (j % 3 + 1) / 4;
        let _ = m.get(j).narrow(1, 0, rows).fill_(1.0);
    }
    m
}

/// Region input: every image goes through the mask-aware extractor, and CSR is the diffusion loss
/// averaged over each image's region (its mask resized to the latents), renormalised by the region's
/// area; with whole-image masks it is the plain mean.
#[test]
fn region_csr_is_the_diffusion_loss_averaged_over_each_region() {
    let cfg = tiny(Stage::II);
    let t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let m = &t.model;
    let mut batch = SyntheticBatches::new(&cfg, 3).batch(0);
    let masks = top_rows_masks(&batch);
    batch.masks = Some(masks.shallow_clone());
    let l = tch::no_grad(|| m.losses(&batch, 11, 5, 0).unwrap());
    let (want, cond) = tch::no_grad(|| {
        let cond = m.vision.forward_regions(&batch.pixels, Some(&masks)).1;
        let d = &m.diffusion;
        let lat = d.latents(&batch.pixels);
        let noise = Stream::new(11, 5, 0, Purpose::CsrNoise).normal(&lat.size());
        let ts = csr_timesteps(
            &mut Stream::new(11, 5, 0, Purpose::CsrTimesteps),
            lat.size()[0] as usize,
        );
        let tt = ints(&ts);
        let pred = d
            .unet
            .forward(&d.ddpm.add_noise(&lat, &noise, &tt), &tt, &cond);
        let (h, w) = (lat.size()[2], lat.size()[3]);
        let ml = masks.upsample_bilinear2d([h, w], false, None, None);
        let err = (pred - noise).square() * &ml;
        let want = err.sum(Kind::Float) / (ml.sum(Kind::Float) * lat.size()[1] as f64);
        (want.double_value(&[]), cond)
    });
    let got = l.csr.double_value(&[]);
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // The extractor changes what the resampler sees: region tokens differ from whole-image ones.
    let whole = tch::no_grad(|| m.vision.forward(&batch.pixels).1);
    assert!((&whole - &cond).abs().max().double_value(&[]) > 1e-3);
    // All-ones masks: the region-averaged loss is the plain mean for the same condition.
    tch::no_grad(|| {
        let ones = Tensor::ones_like(&masks);
        let a = m
            .diffusion
            .csr_loss_regions(&cond, &batch.pixels, Some(&ones), (1, 2, 3))
            .double_value(&[]);
        let b = m
            .diffusion
            .csr_loss(&cond, &batch.pixels, (1, 2, 3))
            .double_value(&[]);
        assert!((a - b).abs() < 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    });
}

/// Stage III trains the mask-aware extractor on region input (NTP only) and leaves it alone without.
#[test]
fn stage_three_trains_the_extractor_only_on_region_input() {
    let cfg = tiny(Stage::III);
    let data = SyntheticBatches::new(&cfg, 3);
    let mut t = Trainer::new(&cfg, Device::Cpu).unwrap();
    let before = snapshot(&t);
    let r = t.step(&data.batch(0)).unwrap();
    assert_eq!((r.nip, r.csr), (0.0, 0.0), "stage III is NTP only");
    let after = snapshot(&t);
    for p in deem::models::region::KEY_PREFIXES {
        assert_eq!(
            changed(&before, &after, p).0,
            0,
            "{p} moved without region input"
        );
    }
    let mut b = data.batch(1);
    b.masks = Some(top_rows_masks(&b));
    t.step(&b).unwrap();
    let last = snapshot(&t);
    for p in deem::models::region::KEY_PREFIXES {
        let (moved, all) = changed(&after, &last, p);
        assert!(all > 0 && moved == all, "{p}: {moved} of {all} moved");
    }
}

/// `vision.mask_aware`: whole images go through the extractor with all-ones masks (the paper's default
/// mask), so a region-tuned model reads them as it was trained to.
#[test]
fn a_mask_aware_model_reads_whole_images_through_the_extractor() {
    let mut cfg = tiny(Stage::III);
    let batch = SyntheticBatches::new(&cfg, 3).batch(0);
    let ones = Tensor::ones(
        [batch.pixels.size()[0], 1, 8, 8],
        (Kind::Float, Device::Cpu),
    );
    let plain = Trainer::new(&cfg, Device::Cpu).unwrap();
    cfg.vision.mask_aware = true;
    let aware = Trainer::new(&cfg, Device::Cpu).unwrap();
    let (a, b, c) = tch::no_grad(|| {
        (
            plain.model.vision.forward(&batch.pixels).0,
            aware.model.vision.forward(&batch.pixels).0,
            plain
                .model
                .vision
                .forward_regions(&batch.pixels, Some(&ones))
                .0,
        )
    });
    assert_eq!(b, c, "mask-aware = all-ones masks");
    assert!((&a - &b).abs().max().double_value(&[]) > 1e-4);
    // Off, the field stays out of the written config (so older run directories keep their hash).
    let mut off = cfg.clone();
    off.vision.mask_aware = false;
    assert!(!toml::to_string(&off).unwrap().contains("mask_aware"));
    assert!(toml::to_string(&cfg).unwrap().contains("mask_aware = true"));
}

/// A training checkpoint written before region support (no extractor weights or moments) still
/// resumes: the extractor keeps its initial values, everything else is restored.
#[test]
fn a_checkpoint_without_the_extractor_resumes() {
    let cfg = tiny(Stage::II);
    let data = SyntheticBatches::new(&cfg, 3);
    let mut t = Trainer::new(&cfg, Device::Cpu).unwrap();
    t.step(&data.batch(0)).unwrap();
    let dir = std::env::temp_dir().join(format!("deem-old-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let full = dir.join("full.safetensors");
    deem::train::save_shard(&full, &t.vs, &t.opt).unwrap();
    let ck = deem::checkpoint::Checkpoint::open(&full).unwrap();
    let old: Vec<(String, Tensor)> = ck
        .names()
        .filter(|n| {
            !deem::models::region::KEY_PREFIXES
                .iter()
                .any(|p| n.contains(p))
        })
        .map(|n| (n.to_string(), ck.tensor(n).unwrap().unwrap()))
        .collect();
    assert!(old.len() < ck.names().count());
    let old_file = dir.join("old.safetensors");
    deem::checkpoint::save(&old_file, &old).unwrap();

    let mut fresh = Trainer::new(&cfg, Device::Cpu).unwrap();
    let init = snapshot(&fresh);
    let old_ck = deem::checkpoint::Checkpoint::open(&old_file).unwrap();
    deem::train::load_shard(&old_ck, &fresh.vs, &mut fresh.opt, 1).unwrap();
    let (trained, restored) = (snapshot(&t), snapshot(&fresh));
    for (k, v) in &restored {
        if deem::models::region::is_extractor_key(k) {
            assert_eq!(v, &init[k], "{k} keeps its initial value");
        } else {
            assert_eq!(v, &trained[k], "{k} restored");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
