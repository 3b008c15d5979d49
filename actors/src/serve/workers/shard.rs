//! An LLM shard's generation work, after text-generation-inference's sharded decode: the shard's layers
//! over every row of a tick (single-token rows batched), each sequence's KV cache in a slot of the
//! shard's pool; the last shard norms, samples and cuts NIP contexts. It runs as a runtime compute actor.

use std::collections::HashMap;

use deem::models::deem::{embed_for_generation, SpecialIds};
use deem::models::llama::{KvPool, LlamaShard};
use deem::text::sampling::{sample_slice, top_log_probs};
use flume::Receiver;
use tch::{Kind, Tensor};
use uuid::Uuid;

use crate::runtime::metrics::{ServeMetrics, ShardLabels};
use crate::runtime::{ComputeCtx, Work};
use crate::serve::error::InferError;
use crate::serve::messages::{Hidden, Inbox, RowInput, RowMeta, RowOut, ShardIn, ShardNext};

/// An LLM shard's compute loop.
pub struct ShardWorker {
    pub name: String,
    pub shard: LlamaShard,
    pub ids: SpecialIds,
    pub device: tch::Device,
    pub input: Receiver<ShardIn>,
    pub next: ShardNext,
    pub metrics: ServeMetrics,
    /// Sequences the shard holds at once (its KV pool's slots).
    pub slots: i64,
}

/// What a shard reports beside the runtime's status.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ShardDetail {
    /// Sequences whose KV cache it holds.
    pub sequences: usize,
    pub kv_cache_bytes: u64,
}

struct ShardState {
    pool: KvPool,
    /// Each sequence's pool slot and cached length.
    seqs: HashMap<Uuid, (i64, i64)>,
    free: Vec<i64>,
    /// Last shard: each sequence's normed hidden states, for NIP contexts.
    hidden: HashMap<Uuid, Vec<Chunk>>,
}

impl ShardState {
    fn bytes(&self) -> u64 {
        let h: u64 = self.hidden.values().flatten().map(Chunk::bytes).sum();
        h + self.seqs.values().map(|&(_, len)| len as u64).sum::<u64>()
            * self.pool.bytes_per_position
    }
}

impl Work for ShardWorker {
    /// Its work arrives on its own input (`ShardIn`), not through the actor.
    type Msg = ();
    type Detail = ShardDetail;

    fn run(self, _inbox: Receiver<()>, ctx: ComputeCtx<ShardDetail>) {
        self.serve(&ctx)
    }
}

impl ShardWorker {
    fn serve(self, ctx: &ComputeCtx<ShardDetail>) {
        let mut st = ShardState {
            pool: self.shard.new_pool(self.slots),
            seqs: HashMap::new(),
            free: (0..self.slots).rev().collect(),
            hidden: HashMap::new(),
        };
        // A clone of the gauge (it shares the value): holding the family's guard would block the
        // other shards from creating theirs.
        let gauge = self
            .metrics
            .kv_cache_bytes
            .get_or_create(&ShardLabels {
                shard: self.name.clone(),
            })
            .clone();
        while let Ok(msg) = self.input.recv() {
            match msg {
                ShardIn::Free(seqs) => {
                    for s in &seqs {
                        if let Some((slot, _)) = st.seqs.remove(s) {
                            st.free.push(slot);
                        }
                        st.hidden.remove(s);
                    }
                    if let ShardNext::Shard(tx) = &self.next {
                        let _ = tx.send(ShardIn::Free(seqs));
                    }
                }
                ShardIn::Fork(pairs) => {
                    for &(from, to) in &pairs {
                        self.fork(&mut st, from, to);
                    }
                    if let ShardNext::Shard(tx) = &self.next {
                        let _ = tx.send(ShardIn::Fork(pairs));
                    }
                }
                ShardIn::Tick {
                    group,
                    epoch,
                    rows,
                    inputs,
                    hidden,
                    error,
                } => {
                    ctx.job();
                    let result = match error {
                        Some(e) => Err(e),
                        None => tch::no_grad(|| self.layers(&mut st, &rows, inputs, hidden)),
                    };
                    match &self.next {
                        ShardNext::Shard(tx) => {
                            let (hidden, error) = match result {
                                Ok(h) => (h, None),
                                Err(e) => (Hidden::default(), Some(e)),
                            };
                            let _ = tx.send(ShardIn::Tick {
                                group,
                                epoch,
                                rows,
                                inputs: vec![],
                                hidden,
                                error,
                            });
                        }
                        ShardNext::Scheduler(tx) => {
                            let out = result
                                .and_then(|h| tch::no_grad(|| self.finish(&mut st, &rows, h)));
                            let _ = tx.send(Inbox::Tick { group, epoch, out });
                        }
                    }
                }
            }
            let bytes = st.bytes();
            gauge.set(bytes as i64);
            ctx.detail(|d| {
                d.sequences = st.seqs.len();
                d.kv_cache_bytes = bytes;
            });
        }
    }

    fn error(&self, message: String) -> InferError {
        InferError::Worker {
            actor: self.name.clone(),
            message,
        }
    }

    /// Gives `to` a slot holding a copy of `from`'s cache (and, on the last shard, its hidden-state log).
    /// Without a free slot `to` stays unknown, and its next tick fails naming the missing cache.
    fn fork(&self, st: &mut ShardState, from: Uuid, to: Uuid) {
        let Some(&(src, len)) = st.seqs.get(&from) else {
            tracing::error!(shard = %self.name, %from, "fork from a sequence this shard does not hold");
            return;
        };
        let Some(slot) = st.free.pop() else {
            tracing::error!(shard = %self.name, "no free KV slot to fork a beam into (serve.max_running)");
            return;
        };
        tch::no_grad(|| st.pool.copy_slot(src, slot, len));
        st.seqs.insert(to, (slot, len));
        if let Some(log) = st.hidden.get(&from) {
            let copy = log.iter().map(Chunk::share).collect();
            st.hidden.insert(to, copy);
        }
    }

    /// This shard's layers over every row; single-token rows run as one batch.
    fn layers(
        &self,
        st: &mut ShardState,
        rows: &[RowMeta],
        inputs: Vec<RowInput>,
        hidden: Hidden,
    ) -> Result<Hidden, InferError> {
        let dev = self.device;
        let input = if self.shard.is_first() {
            self.embed(inputs)?
        } else {
            Hidden {
                batch: hidden.batch.map(|(ix, t)| (ix, t.to_device(dev))),
                rows: hidden
                    .rows
                    .into_iter()
                    .map(|(i, t)| (i, t.to_device(dev)))
                    .collect(),
            }
        };
        // Each row's length this tick, then its slot, checking it continues where its cache ends.
        let mut len_of = vec![0i64; rows.len()];
        if let Some((ix, _)) = &input.batch {
            ix.iter().for_each(|&i| len_of[i] = 1);
        }
        input
            .rows
            .iter()
            .for_each(|(i, t)| len_of[*i] = t.size()[1]);
        let room = self.shard.cfg.max_position_embeddings;
        let mut slots = Vec::with_capacity(rows.len());
        for (r, &t) in rows.iter().zip(&len_of) {
            let (slot, len) = match st.seqs.get(&r.seq) {
                Some(&e) => e,
                None => {
                    let slot = st.free.pop().ok_or_else(|| {
                        self.error(format!(
                            "all {} KV slots are taken (serve.max_running)",
                            self.slots
                        ))
                    })?;
                    st.seqs.insert(r.seq, (slot, 0));
                    (slot, 0)
                }
            };
            if t == 0 || len != r.start || r.start + t > room {
                return Err(self.error(format!(
                    "sequence {} continues at position {} with {t} positions, but its cache holds {len} (of at most {room})",
                    r.seq, r.start
                )));
            }
            slots.push(slot);
        }
        let batch = input.batch.map(|(ix, x)| {
            let sl: Vec<i64> = ix.iter().map(|&i| slots[i]).collect();
            let pos: Vec<i64> = ix.iter().map(|&i| rows[i].start).collect();
            let h = self.shard.forward_slots(&x, &sl, &pos, &mut st.pool);
            (ix, h)
        });
        let others = input
            .rows
            .into_iter()
            .map(|(i, x)| {
                let h = self
                    .shard
                    .forward_slot(&x, slots[i], rows[i].start, &mut st.pool);
                (i, h)
            })
            .collect();
        for (r, t) in rows.iter().zip(len_of) {
            if let Some(e) = st.seqs.get_mut(&r.seq) {
                e.1 = r.start + t;
            }
        }
        Ok(Hidden {
            batch,
            rows: others,
        })
    }

    /// First shard: single-token rows embedded in one lookup, the others one by one.
    fn embed(&self, inputs: Vec<RowInput>) -> Result<Hidden, InferError> {
        let dev = self.device;
        let mut ix = Vec::new();
        let mut ids = Vec::new();
        let mut out = Hidden::default();
        for (i, inp) in inputs.into_iter().enumerate() {
            match inp {
                RowInput::Ids {
                    ids: t,
                    visual: None,
                } if t.len() == 1 => {
                    ix.push(i);
                    ids.push(t[0]);
                }
                RowInput::Ids { ids: t, visual } => {
                    let t = Tensor::from_slice(&t).to_device(dev).unsqueeze(0);
                    let visual = visual.map(|v| v.to_device(dev));
                    let e = embed_for_generation(&self.shard, &t, visual.as_ref(), self.ids)
                        .map_err(|e| self.error(e.to_string()))?;
                    out.rows.push((i, e));
                }
                RowInput::Embeds(e) => out.rows.push((i, e.to_device(dev).unsqueeze(0))),
            }
        }
        if !ix.is_empty() {
            let t = Tensor::from_slice(&ids).to_device(dev).unsqueeze(1);
            let e = embed_for_generation(&self.shard, &t, None, self.ids)
                .map_err(|e| self.error(e.to_string()))?;
            out.batch = Some((ix, e));
        }
        Ok(out)
    }

    /// Last shard: norm, keep the hidden states, sample, and cut NIP contexts.
    fn finish(
        &self,
        st: &mut ShardState,
        rows: &[RowMeta],
        hidden: Hidden,
    ) -> Result<Vec<RowOut>, InferError> {
        // The last position of every row, batched rows first, read back once for sampling.
        let mut order: Vec<usize> = Vec::with_capacity(rows.len());
        let mut last: Vec<Tensor> = Vec::new();
        if let Some((ix, h)) = &hidden.batch {
            let n = self.shard.norm(h); // [B, 1, L]
            for (k, &i) in ix.iter().enumerate() {
                order.push(i);
                st.hidden
                    .entry(rows[i].seq)
                    .or_default()
                    .push(Chunk::Row(n.shallow_clone(), k as i64));
            }
            last.push(n.squeeze_dim(1));
        }
        for (i, h) in &hidden.rows {
            let n = self.shard.norm(h).get(0); // [T, L]
            order.push(*i);
            last.push(n.narrow(0, n.size()[0] - 1, 1));
            st.hidden
                .entry(rows[*i].seq)
                .or_default()
                .push(Chunk::Whole(n));
        }
        let logits = self.shard.logits(&Tensor::cat(&last, 0));
        let vocab = logits.size()[1] as usize;
        let flat: Vec<f64> = Vec::try_from(
            logits
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Double)
                .reshape([-1]),
        )
        .map_err(|e| self.error(format!("reading the logits: {e}")))?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, &i) in order.iter().enumerate() {
            let r = &rows[i];
            let context = match r.context_from {
                Some(from) => {
                    let log = st.hidden.entry(r.seq).or_default();
                    let all =
                        Tensor::cat(&log.iter().map(Chunk::materialize).collect::<Vec<_>>(), 0);
                    let end = all.size()[0];
                    if from < 0 || from >= end {
                        return Err(self.error(format!(
                            "NIP context from position {from}, but sequence {} has {end}",
                            r.seq
                        )));
                    }
                    let ctx = all.narrow(0, from, end - from).flip([0]);
                    *log = vec![Chunk::Whole(all)];
                    Some(ctx)
                }
                None => None,
            };
            let (mut token, mut top) = (None, Vec::new());
            if let Some(s) = &r.sample {
                let row = flat[k * vocab..(k + 1) * vocab].to_vec();
                if s.beam > 0 {
                    top = top_log_probs(row, &s.params, &s.seen, &s.banned, s.beam);
                } else {
                    token = Some(sample_slice(row, &s.params, &s.seen, &s.banned, s.index));
                }
            }
            out.push(RowOut {
                seq: r.seq,
                token,
                top,
                context,
            });
        }
        Ok(out)
    }
}

/// A piece of a sequence's hidden-state log on the last shard.
enum Chunk {
    /// [T, L].
    Whole(Tensor),
    /// Row k of a decode batch [B, 1, L] (shared, so logging costs no copy).
    Row(Tensor, i64),
}

impl Chunk {
    /// The same piece, sharing its storage.
    fn share(&self) -> Chunk {
        match self {
            Chunk::Whole(t) => Chunk::Whole(t.shallow_clone()),
            Chunk::Row(t, k) => Chunk::Row(t.shallow_clone(), *k),
        }
    }

    fn materialize(&self) -> Tensor {
        match self {
            Chunk::Whole(t) => t.shallow_clone(),
            Chunk::Row(t, k) => t.get(*k),
        }
    }

    /// Bytes of the positions it stands for.
    fn bytes(&self) -> u64 {
        let (t, positions) = match self {
            Chunk::Whole(t) => (t, t.size()[0]),
            Chunk::Row(t, _) => (t, 1),
        };
        (positions * t.size().last().copied().unwrap_or(0)) as u64
            * t.kind().elt_size_in_bytes() as u64
    }
}
