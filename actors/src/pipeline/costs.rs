//! `deem bench layers`: each part's per-microbatch cost measured on a device with the stages' own code
//! (`forward::compute` and the stage backward, at the configuration's microbatch of the built-in
//! synthetic batches): forward and backward seconds (median of the repeats after one warm-up), the
//! AdamW step, and the bytes a microbatch's forward keeps until its backward. On the CPU those bytes
//! are the resident-memory growth while the forward's graph is alive, with every allocation of 4 KiB or
//! more made its own mapping (glibc's `M_MMAP_THRESHOLD`) so that what is freed leaves the count; on
//! an accelerator they come from `deem::cost`. The LLM's parts come from three one-layer shards: the
//! first (embedding + layer), a middle one (a layer) and the last (layer + heads).

use std::collections::BTreeMap;
use std::time::Instant;

use deem::config::DeemConfig;
use deem::data::batches::SyntheticBatches;
use deem::models::deem::special_ids;
use deem::train::Group;
use tch::Tensor;

use super::error::PipelineError;
use super::forward::{backward_of, compute, leaf, Computed, Ctx, MbData, MbPlan, Received};
use super::modules::{build, Role};
use super::plan::{Costs, Piece};

type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Resident bytes of this process (`/proc/self/statm`; 0 where it cannot be read).
pub fn resident_bytes() -> u64 {
    let pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}

/// Makes every allocation of 4 KiB or more a mapping of its own, returned to the system when freed, so
/// that resident memory follows the live tensors (process-wide; for measurements).
pub fn exact_resident_accounting() {
    // SAFETY: mallopt only tunes glibc's allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4096);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One stage's measured microbatch, and the forward's outputs for the next part's input.
struct Measured {
    piece: Piece,
    out: Computed,
}

fn measure_role(
    cfg: &DeemConfig,
    role: Role,
    device: tch::Device,
    data: &MbData,
    rx: &dyn Fn() -> Received,
    reps: usize,
) -> Result<Measured> {
    let fail =
        |e: Box<dyn std::error::Error + Send + Sync>| PipelineError::stage("bench", e.to_string());
    let (_vs, modules, mut opt) = build(&role, cfg, device).map_err(fail)?;
    let ctx = Ctx {
        name: "bench",
        cfg,
        ids: special_ids(cfg),
        dev: device,
        step: 0,
        plan: MbPlan {
            offset: 0,
            total: 1,
            loss_scale: 1.0,
        },
    };
    let cpu = device == tch::Device::Cpu;
    let (mut fwd, mut bwd, mut bytes, mut optim) = (vec![], vec![], vec![], vec![]);
    let mut last = None;
    for rep in 0..=reps {
        let received = rx();
        let before = resident_bytes();
        let t = Instant::now();
        let c = compute(&modules, &ctx, 0, data, &received)?;
        sync(device);
        let f = t.elapsed().as_secs_f64();
        let kept = resident_bytes().saturating_sub(before) as f64;
        let grads: Vec<Tensor> = [&c.output, &c.csr_output]
            .iter()
            .map(|o| {
                o.as_ref().map_or_else(
                    || Tensor::zeros([0], tch::kind::FLOAT_CPU),
                    |o| o.randn_like(),
                )
            })
            .collect();
        let t = Instant::now();
        backward_of(
            c.loss.as_ref(),
            1.0,
            [
                (c.output.as_ref(), Some(&grads[0])),
                (c.csr_output.as_ref(), Some(&grads[1])),
            ],
        );
        opt.accumulate(1.0);
        sync(device);
        let b = t.elapsed().as_secs_f64();
        let lrs: BTreeMap<Group, f64> = [Group::Encoder, Group::Llm, Group::Other]
            .into_iter()
            .map(|g| (g, 0.0))
            .collect();
        let t = Instant::now();
        opt.step(&lrs, 1.0);
        opt.zero_grad();
        sync(device);
        let o = t.elapsed().as_secs_f64();
        if rep > 0 {
            fwd.push(f);
            bwd.push(b);
            bytes.push(kept);
            optim.push(o);
        }
        last = Some(c);
    }
    Ok(Measured {
        piece: Piece {
            forward_s: median(fwd),
            backward_s: median(bwd),
            activation_bytes: if cpu { median(bytes) } else { f64::NAN },
            optimizer_s: median(optim),
        },
        out: last.ok_or_else(|| PipelineError::stage("bench", "no repeat ran"))?,
    })
}

fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn first_tensor(t: &Option<(Option<Vec<Tensor>>, Vec<i64>)>) -> Option<Tensor> {
    t.as_ref()
        .and_then(|(v, _)| v.as_ref())
        .map(|v| v[0].shallow_clone())
}

/// Every part's cost per microbatch of `cfg` on `device`, `reps` repeats each.
pub fn measure(cfg: &DeemConfig, device: tch::Device, reps: usize) -> Result<Costs> {
    let l = cfg.llm.num_hidden_layers;
    if l < 3 {
        return Err(PipelineError::stage(
            "bench",
            format!("llm.num_hidden_layers = {l}: measuring a middle layer needs at least 3"),
        ));
    }
    if device == tch::Device::Cpu {
        exact_resident_accounting();
    }
    let synth = SyntheticBatches::new(cfg, 0);
    let shape = synth.shape();
    let ids = special_ids(cfg);
    let mb = synth
        .batch(0)
        .split(cfg.train.microbatches as i64, ids.soi)?
        .swap_remove(0);
    let data = MbData {
        id: uuid::Uuid::nil(),
        span: tracing::Span::none(),
        ids: Some(mb.input_ids.shallow_clone()),
        loss_mask: None,
        pixels: Some(mb.pixels.shallow_clone()),
        masks: None,
    };
    let input = |t: &Option<Tensor>| {
        let t = t.as_ref().map(|t| t.shallow_clone());
        move || Received {
            input: t.as_ref().map(|t| leaf(t, device)),
            ..Default::default()
        }
    };
    let vision = measure_role(cfg, Role::Vision, device, &data, &Received::default, reps)?;
    let visual = first_tensor(&vision.out.fwd);
    let csr = vision
        .out
        .csr
        .as_ref()
        .and_then(|c| c.as_ref())
        .map(|c| c[0].shallow_clone());
    let llm = |layers, rx: &dyn Fn() -> Received| {
        measure_role(cfg, Role::Llm { layers }, device, &data, rx, reps)
    };
    let first = llm(0..1, &input(&visual))?;
    let hidden = first_tensor(&first.out.fwd);
    let middle = llm(1..2, &input(&hidden))?;
    let last = llm(l - 1..l, &input(&hidden))?;
    let nip = last.out.fwd.as_ref().and_then(|(v, index)| {
        v.as_ref()
            .map(|v| (v[0].shallow_clone(), v[1].shallow_clone(), index.clone()))
    });
    let diffusion_rx = || Received {
        input: nip.as_ref().map(|(c, _, _)| leaf(c, device)),
        nip: nip
            .as_ref()
            .map(|(_, m, index)| (m.to_device(device), index.clone())),
        csr_input: csr.as_ref().map(|c| leaf(c, device)),
    };
    let diffusion = measure_role(cfg, Role::Diffusion, device, &data, &diffusion_rx, reps)?;
    let layer = middle.piece;
    let less = |a: Piece| Piece {
        forward_s: (a.forward_s - layer.forward_s).max(0.0),
        backward_s: (a.backward_s - layer.backward_s).max(0.0),
        activation_bytes: (a.activation_bytes - layer.activation_bytes).max(0.0),
        optimizer_s: (a.optimizer_s - layer.optimizer_s).max(0.0),
    };
    let mut costs = Costs {
        source: format!(
            "measured on {device:?} by deem bench layers ({reps} repeats, {} threads)",
            tch::get_num_threads()
        ),
        rows: shape.rows,
        tokens: shape.tokens,
        images: shape.images,
        nip_images: shape.nip_images,
        vision: vision.piece,
        llm_embed: less(first.piece),
        llm_layer: layer,
        llm_head: less(last.piece),
        diffusion: diffusion.piece,
    };
    if device != tch::Device::Cpu {
        // No allocator statistics here: the activation bytes are deem::cost's.
        let est = Costs::estimate(cfg, shape, 1.0, 1.0);
        for (p, e) in [
            (&mut costs.vision, est.vision),
            (&mut costs.llm_embed, est.llm_embed),
            (&mut costs.llm_layer, est.llm_layer),
            (&mut costs.llm_head, est.llm_head),
            (&mut costs.diffusion, est.diffusion),
        ] {
            p.activation_bytes = e.activation_bytes;
        }
    }
    Ok(costs)
}
