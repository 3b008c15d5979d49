//! The vision worker's generation work: images → visual tokens and CSR conditions (prompt images, and
//! each image the model draws before it joins the context). It runs as a runtime compute actor.

use deem::models::deem::VisionStage;
use flume::{Receiver, Sender};

use crate::runtime::compute::NoDetail;
use crate::runtime::{ComputeCtx, Work};
use crate::serve::messages::{Inbox, VisionJob};

/// The vision actor's compute loop: images → visual tokens and CSR conditions.
pub struct VisionWorker {
    pub stage: VisionStage,
    pub device: tch::Device,
    pub input: Receiver<VisionJob>,
    pub output: Sender<Inbox>,
}

impl Work for VisionWorker {
    /// Its jobs arrive on its own input, not through the actor.
    type Msg = ();
    type Detail = NoDetail;

    fn run(self, _inbox: Receiver<()>, ctx: ComputeCtx<NoDetail>) {
        while let Ok(job) = self.input.recv() {
            ctx.job();
            let out = tch::no_grad(|| {
                let (v, c) = self
                    .stage
                    .forward_regions(&job.pixels.to_device(self.device), job.masks.as_ref());
                Ok((v, c))
            });
            let _ = self.output.send(Inbox::Encoded {
                seq: job.seq,
                generated: job.generated,
                out,
            });
        }
    }
}
