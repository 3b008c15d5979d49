//! The diffusion worker's generation work: draws images from NIP contexts (waiting draws with the same
//! steps and guidance run as one batch, guidance as one doubled batch) and scores input images by their
//! CSR loss. It runs as a runtime compute actor.

use std::time::Instant;

use deem::models::deem::DiffusionStage;
use flume::{Receiver, Sender};
use tch::{Kind, Tensor};
use uuid::Uuid;

use crate::runtime::compute::NoDetail;
use crate::runtime::metrics::ServeMetrics;
use crate::runtime::{ComputeCtx, Work};
use crate::serve::error::InferError;
use crate::serve::messages::{DiffusionJob, Inbox};

/// The diffusion actor's compute loop: draws images (waiting draws with the same steps and guidance run
/// as one batch, guidance as one doubled batch) and scores input images by their CSR loss.
pub struct DiffusionWorker {
    pub name: String,
    pub stage: DiffusionStage,
    pub device: tch::Device,
    pub input: Receiver<DiffusionJob>,
    pub output: Sender<Inbox>,
    pub metrics: ServeMetrics,
    pub max_batch: usize,
}

struct Draw {
    seq: Uuid,
    context: Tensor,
    seed: u64,
    image: u64,
}

impl Work for DiffusionWorker {
    /// Its jobs arrive on its own input, not through the actor.
    type Msg = ();
    type Detail = NoDetail;

    fn run(self, _inbox: Receiver<()>, ctx: ComputeCtx<NoDetail>) {
        while let Ok(first) = self.input.recv() {
            ctx.job();
            let mut jobs = vec![first];
            while jobs.len() < self.max_batch {
                match self.input.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let mut draws: Vec<((i64, deem::config::SamplerKind, u64), Draw)> = Vec::new();
            for job in jobs {
                match job {
                    DiffusionJob::Score {
                        seq,
                        cond,
                        pixels,
                        masks,
                        timesteps,
                    } => {
                        let scores = tch::no_grad(|| {
                            self.stage.csr_scores(
                                &cond.to_device(self.device),
                                &pixels.to_device(self.device),
                                masks.as_ref(),
                                &timesteps,
                                0,
                            )
                        });
                        let _ = self.output.send(Inbox::Scored {
                            seq,
                            out: Ok(scores),
                        });
                    }
                    DiffusionJob::Draw {
                        seq,
                        context,
                        steps,
                        sampler,
                        guidance,
                        seed,
                        image,
                    } => draws.push((
                        (steps, sampler, guidance.to_bits()),
                        Draw {
                            seq,
                            context,
                            seed,
                            image,
                        },
                    )),
                }
            }
            while !draws.is_empty() {
                let key = draws[0].0;
                let (batch, rest): (Vec<_>, Vec<_>) =
                    draws.into_iter().partition(|(k, _)| *k == key);
                draws = rest;
                let batch: Vec<Draw> = batch.into_iter().map(|(_, d)| d).collect();
                self.draw((key.0, key.1), f64::from_bits(key.2), batch);
            }
        }
    }
}

impl DiffusionWorker {
    fn draw(
        &self,
        (steps, sampler): (i64, deem::config::SamplerKind),
        guidance: f64,
        batch: Vec<Draw>,
    ) {
        let dev = self.device;
        let maxlen = batch.iter().map(|d| d.context.size()[0]).max().unwrap_or(1);
        let ctx: Vec<Tensor> = batch
            .iter()
            .map(|d| {
                let c = d.context.to_device(dev);
                c.constant_pad_nd([0, 0, 0, maxlen - c.size()[0]])
            })
            .collect();
        let mask: Vec<Tensor> = batch
            .iter()
            .map(|d| {
                let n = d.context.size()[0];
                Tensor::cat(
                    &[
                        Tensor::ones([n], (Kind::Bool, dev)),
                        Tensor::zeros([maxlen - n], (Kind::Bool, dev)),
                    ],
                    0,
                )
            })
            .collect();
        let noise: Vec<Tensor> = batch
            .iter()
            .map(|d| self.stage.initial_noise(d.seed, d.image).to_device(dev))
            .collect();
        let mut last = Instant::now();
        let hist = &self.metrics.diffusion_step_seconds;
        // DDPM's per-step noise, each image's from its own stream.
        let step_noise = |i: usize| {
            let rows: Vec<Tensor> = batch
                .iter()
                .map(|d| self.stage.step_noise(d.seed, d.image, i))
                .collect();
            Tensor::stack(&rows, 0).to_device(dev)
        };
        let pixels = self.stage.draw(
            (
                &Tensor::stack(&ctx, 0),
                &Tensor::stack(&mask, 0),
                &Tensor::stack(&noise, 0),
            ),
            (sampler, steps, guidance),
            step_noise,
            || {
                hist.observe(last.elapsed().as_secs_f64());
                last = Instant::now();
            },
        );
        for (i, d) in batch.iter().enumerate() {
            let p = pixels.get(i as i64);
            let out = deem::models::vision::png_bytes(&p)
                .map(|png| (p, png))
                .map_err(|e| InferError::Worker {
                    actor: self.name.clone(),
                    message: format!("encoding the drawn image as PNG: {e}"),
                });
            let _ = self.output.send(Inbox::Drawn { seq: d.seq, out });
        }
    }
}
