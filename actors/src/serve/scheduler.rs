//! The scheduler, after text-generation-inference's continuous batching: it owns every running
//! sequence's state machine (encoding its images → ready → in a tick → drawing an image → …), takes
//! requests from the admission queue between ticks while KV slots are free, and sends ticks down the
//! LLM shards. Active sequences are spread over as many micro-batch groups as there are shards; each
//! group is one tick in flight at a time, so while shard 1 decodes group A, shard 0 decodes group B.
//! New requests join a group between its ticks (prompt tokens per tick bounded by
//! `serve.token_budget`). A sequence that emits `<|startofimage|>` leaves the decode rounds while the
//! diffusion worker draws its image and the vision worker encodes it, then continues with the image's
//! visual tokens in its context. Finished, failed and cancelled sequences free their caches at once (a
//! `Free` message follows their last tick down the shards). A worker's death (from its supervisor)
//! fails every sequence in flight and every request admitted after it. Beam search's steps live in `beam.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deem::config::DeemConfig;
use deem::models::deem::SpecialIds;
use deem::text::sampling::BeamSearch;
use deem::text::tokenizer::DeemTokenizer;
use flume::Sender;
use tch::Tensor;
use uuid::Uuid;

use super::admission::{AdmissionQueue, Queued};
use super::error::InferError;
use super::events::{CsrScore, Event};
use super::messages::{
    DiffusionJob, Hidden, Inbox, RowInput, RowMeta, RowOut, SampleSpec, ShardIn, VisionJob,
};
use super::validation::ValidRequest;
use crate::runtime::metrics::{RequestLabels, ServeMetrics};
use crate::runtime::Failure;

#[derive(Debug, Clone, Default)]
pub(super) struct GroupState {
    in_flight: bool,
    /// Sequences assigned to the group.
    members: usize,
}

/// What a sequence feeds next.
pub(super) enum Feed {
    Prompt {
        visual: Option<Tensor>,
    },
    Token(i64),
    Image(Tensor),
    /// Beam search: the newest id of each live hypothesis, in the order of the beam's caches.
    Beams(Vec<i64>),
}

/// A beam-search request's state.
pub(super) struct Beam {
    pub(super) search: BeamSearch,
    /// The cache (shard sequence id) of each live hypothesis.
    pub(super) caches: Vec<Uuid>,
    /// This step's candidates, per live hypothesis.
    pub(super) got: Vec<Option<Vec<(i64, f64)>>>,
}

pub(super) enum SeqState {
    /// Prompt images at the vision actor.
    Encoding,
    Ready(Feed),
    InTick,
    /// Its image is being drawn, or encoded after drawing.
    Drawing,
}

pub(super) struct Seq {
    pub(super) req: ValidRequest,
    pub(super) events: Sender<Result<Event, InferError>>,
    pub(super) group: usize,
    pub(super) state: SeqState,
    /// Ids of every position fed so far (placeholders for image positions).
    pub(super) tokens: Vec<i64>,
    pub(super) sampled: u64,
    pub(super) images_drawn: usize,
    /// Text ids since the last image, and how many bytes of their text were sent.
    pub(super) text_ids: Vec<u32>,
    pub(super) sent: usize,
    pub(super) csr_pending: bool,
    pub(super) finish: Option<&'static str>,
    pub(super) first_token: Option<Instant>,
    pub(super) last_token: Option<Instant>,
    pub(super) deadline: Instant,
    pub(super) beam: Option<Beam>,
}

impl Seq {
    /// KV slots the sequence may hold at once.
    pub(super) fn slots(&self) -> usize {
        self.req.num_beams.max(1)
    }
}

pub(super) struct Scheduler {
    pub(super) cfg: DeemConfig,
    pub(super) ids: SpecialIds,
    pub(super) eos: i64,
    pub(super) tokenizer: Arc<DeemTokenizer>,
    /// Visual tokens per image.
    pub(super) k: usize,
    pub(super) queue: AdmissionQueue,
    pub(super) inbox: flume::Receiver<Inbox>,
    pub(super) shard0: Sender<ShardIn>,
    pub(super) vision: Sender<VisionJob>,
    pub(super) diffusion: Sender<DiffusionJob>,
    pub(super) metrics: ServeMetrics,
    pub(super) seqs: HashMap<Uuid, Seq>,
    pub(super) groups: Vec<GroupState>,
    pub(super) to_free: Vec<Uuid>,
    /// Beam caches other than the request's own id → the request.
    pub(super) owner: HashMap<Uuid, Uuid>,
    /// A request taken from the queue that waits for enough free KV slots.
    pub(super) parked: Option<Queued>,
    /// The worker failure that made the service unready for good: every later request fails with it.
    pub(super) failed: Option<Failure>,
    /// Workers the supervisor is rebuilding: requests wait in the queue until none is left.
    pub(super) down: Vec<String>,
    /// Bumped by every worker failure; a tick of an earlier epoch is ignored when it comes back.
    pub(super) epoch: u64,
}

pub(super) fn count(m: &ServeMetrics, s: &str) {
    m.requests
        .get_or_create(&RequestLabels {
            status: s.to_string(),
        })
        .inc();
}

impl Scheduler {
    pub(super) fn run(mut self) {
        let mut closed = false;
        loop {
            // Admit between ticks, while KV slots are free and no worker is being rebuilt.
            if !self.paused() {
                if let Some(r) = self.parked.take() {
                    self.offer(r);
                }
            }
            while !closed && !self.paused() && self.parked.is_none() && self.free_slots() > 0 {
                match self.queue.rx.try_recv() {
                    Ok(r) => self.offer(r),
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => closed = true,
                }
            }
            self.reap();
            self.launch();
            if closed && self.seqs.is_empty() && self.parked.is_none() {
                break;
            }
            let can_admit =
                !closed && !self.paused() && self.parked.is_none() && self.free_slots() > 0;
            let wait = Duration::from_millis(if self.seqs.is_empty() { 200 } else { 20 });
            let got = if can_admit {
                flume::Selector::new()
                    .recv(&self.inbox, |m| m.ok().map(Either::Inbox))
                    .recv(&self.queue.rx, |r| match r {
                        Ok(r) => Some(Either::Request(r)),
                        Err(_) => None,
                    })
                    .wait_timeout(wait)
                    .ok()
                    .flatten()
            } else {
                self.inbox.recv_timeout(wait).ok().map(Either::Inbox)
            };
            match got {
                Some(Either::Inbox(m)) => self.handle(m),
                Some(Either::Request(r)) => self.offer(r),
                None => {
                    if can_admit && self.queue.rx.is_disconnected() {
                        closed = true;
                    }
                }
            }
            while let Ok(m) = self.inbox.try_recv() {
                self.handle(m);
            }
        }
        self.flush_frees();
    }

    /// A worker is being rebuilt (and none failed for good): queued requests wait.
    fn paused(&self) -> bool {
        !self.down.is_empty() && self.failed.is_none()
    }

    /// KV slots no running sequence may claim.
    fn free_slots(&self) -> usize {
        let used: usize = self.seqs.values().map(Seq::slots).sum();
        self.cfg.serve.max_running.saturating_sub(used)
    }

    /// Admits `req` if its slots are free, else parks it until they are.
    fn offer(&mut self, req: Queued) {
        if req.req.num_beams.max(1) <= self.free_slots() || self.seqs.is_empty() {
            self.admit(req);
        } else {
            self.parked = Some(req);
        }
    }

    fn admit(&mut self, queued: Queued) {
        self.queue.taken();
        let Queued { req, events } = queued;
        if events.is_disconnected() {
            count(&self.metrics, "cancelled");
            return;
        }
        if let Some(f) = &self.failed {
            let _ = events.send(Err(InferError::WorkerDied {
                actor: f.actor.clone(),
                error: f.error.clone(),
                restarting: false,
            }));
            count(&self.metrics, "error");
            return;
        }
        self.metrics
            .request_queue_time_seconds
            .observe(req.arrived.elapsed().as_secs_f64());
        let group = (0..self.groups.len())
            .min_by_key(|&g| self.groups[g].members)
            .unwrap_or(0);
        self.groups[group].members += 1;
        let state = match &req.images {
            Some(px) if px.size()[0] > 0 => {
                let _ = self.vision.send(VisionJob {
                    seq: req.id,
                    pixels: px.shallow_clone(),
                    masks: req.masks.as_ref().map(Tensor::shallow_clone),
                    generated: false,
                });
                SeqState::Encoding
            }
            _ => SeqState::Ready(Feed::Prompt { visual: None }),
        };
        let deadline = req.arrived + req.timeout;
        let id = req.id;
        let beam = (req.num_beams > 1).then(|| {
            let room =
                (self.cfg.llm.max_position_embeddings as usize).saturating_sub(req.prompt.len());
            Beam {
                search: BeamSearch::new(req.num_beams, self.eos, req.max_tokens.min(room), 1.0),
                caches: vec![id],
                got: vec![None],
            }
        });
        self.seqs.insert(
            id,
            Seq {
                req,
                events,
                group,
                state,
                tokens: Vec::new(),
                sampled: 0,
                images_drawn: 0,
                text_ids: Vec::new(),
                sent: 0,
                csr_pending: false,
                finish: None,
                first_token: None,
                last_token: None,
                deadline,
                beam,
            },
        );
        self.metrics
            .num_requests_running
            .set(self.seqs.len() as i64);
    }

    /// Ends cancelled (client gone) and timed-out sequences.
    fn reap(&mut self) {
        let now = Instant::now();
        let gone: Vec<(Uuid, bool)> = self
            .seqs
            .iter()
            .filter_map(|(id, s)| {
                if s.events.is_disconnected() {
                    Some((*id, false))
                } else if now >= s.deadline {
                    Some((*id, true))
                } else {
                    None
                }
            })
            .collect();
        for (id, timeout) in gone {
            if timeout {
                let seconds = self.cfg.serve.request_timeout_s;
                self.fail(id, InferError::Timeout { seconds });
            } else {
                self.drop_seq(id, "cancelled");
            }
        }
    }

    /// Sends a tick for every idle group that has work.
    fn launch(&mut self) {
        for g in 0..self.groups.len() {
            if self.groups[g].in_flight {
                continue;
            }
            let mut ready: Vec<Uuid> = self
                .seqs
                .iter()
                .filter(|(_, s)| s.group == g && matches!(s.state, SeqState::Ready(_)))
                .map(|(id, _)| *id)
                .collect();
            ready.sort_by_key(|id| self.seqs[id].req.arrived);
            let mut budget = self.cfg.serve.token_budget;
            let mut rows = Vec::new();
            let mut inputs = Vec::new();
            for id in ready {
                let prompt_len = match &self.seqs[&id].state {
                    SeqState::Ready(Feed::Prompt { .. }) => self.seqs[&id].req.prompt.len(),
                    _ => 0,
                };
                if prompt_len > 0 && !rows.is_empty() && prompt_len > budget {
                    continue;
                }
                budget = budget.saturating_sub(prompt_len);
                if self.seqs[&id].beam.is_some() {
                    for (row, input) in self.beam_rows(id) {
                        rows.push(row);
                        inputs.push(input);
                    }
                } else {
                    let (row, input) = self.row(id);
                    rows.push(row);
                    inputs.push(input);
                }
            }
            if rows.is_empty() {
                continue;
            }
            self.metrics.batch_size.observe(rows.len() as f64);
            self.groups[g].in_flight = true;
            if self
                .shard0
                .send(ShardIn::Tick {
                    group: g,
                    epoch: self.epoch,
                    rows,
                    inputs,
                    hidden: Hidden::default(),
                    error: None,
                })
                .is_err()
            {
                tracing::error!("the first LLM shard stopped");
            }
        }
    }

    /// Builds a sequence's row and marks it in flight.
    fn row(&mut self, id: Uuid) -> (RowMeta, RowInput) {
        let (soi, sniffer, k) = (self.ids.soi, self.ids.sniffer, self.k);
        let bos = self.ids.bos;
        let s = self.seqs.get_mut(&id).expect("ready sequence");
        let start = s.tokens.len() as i64;
        let feed = match std::mem::replace(&mut s.state, SeqState::InTick) {
            SeqState::Ready(f) => f,
            _ => unreachable!("only ready sequences get rows"),
        };
        let mut context_from = None;
        let input = match feed {
            Feed::Prompt { visual } => {
                s.tokens.extend_from_slice(&s.req.prompt);
                self.metrics.prompt_tokens.inc_by(s.req.prompt.len() as u64);
                RowInput::Ids {
                    ids: s.req.prompt.clone(),
                    visual,
                }
            }
            Feed::Token(t) => {
                s.tokens.push(t);
                if t == soi {
                    let pos = s.tokens.len() - 1;
                    let from = s.tokens[..pos].iter().rposition(|&x| x == bos).unwrap_or(0);
                    context_from = Some(from as i64);
                }
                RowInput::Ids {
                    ids: vec![t],
                    visual: None,
                }
            }
            Feed::Image(v) => {
                s.tokens.extend(std::iter::repeat_n(sniffer, k));
                RowInput::Embeds(v)
            }
            Feed::Beams(_) => unreachable!("beam rows come from beam_rows"),
        };
        let sample = context_from.is_none().then(|| {
            let mut banned = vec![sniffer];
            if s.images_drawn >= s.req.max_images {
                banned.push(soi);
            }
            // The context is only read by the repetition penalty.
            let seen = if s.req.params.repetition_penalty != 1.0 {
                s.tokens.iter().copied().filter(|&t| t != sniffer).collect()
            } else {
                Vec::new()
            };
            SampleSpec {
                params: s.req.params.clone(),
                seen,
                banned,
                index: s.sampled,
                beam: 0,
            }
        });
        (
            RowMeta {
                seq: id,
                start,
                sample,
                context_from,
            },
            input,
        )
    }

    fn handle(&mut self, m: Inbox) {
        match m {
            Inbox::WorkerFailed(f) => self.worker_failed(f),
            Inbox::WorkerRestarted(r) => {
                self.down.retain(|a| *a != r.actor);
                tracing::info!(actor = %r.actor, recovery_s = r.recovery_s, waiting = self.down.len(),
                    "worker back; admission resumes once no worker is down");
            }
            // Sent before a worker failed: its sequences have been failed already.
            Inbox::Tick { epoch, .. } if epoch != self.epoch => {}
            Inbox::Tick { group, out, .. } => {
                self.groups[group].in_flight = false;
                match out {
                    Ok(rows) => {
                        for r in rows {
                            self.tick_result(r);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "decode tick failed");
                        let ids: Vec<Uuid> = self
                            .seqs
                            .iter()
                            .filter(|(_, s)| {
                                s.group == group && matches!(s.state, SeqState::InTick)
                            })
                            .map(|(id, _)| *id)
                            .collect();
                        for id in ids {
                            self.fail(id, e.clone());
                        }
                    }
                }
            }
            Inbox::Encoded {
                seq,
                generated,
                out,
            } => {
                let Some(s) = self.seqs.get_mut(&seq) else {
                    return;
                };
                match out {
                    Err(e) => self.fail(seq, e),
                    Ok((visual, cond)) => {
                        if generated {
                            s.state = SeqState::Ready(Feed::Image(visual.get(0)));
                        } else {
                            if s.req.csr_score {
                                if let Some(px) = &s.req.images {
                                    s.csr_pending = true;
                                    let _ = self.diffusion.send(DiffusionJob::Score {
                                        seq,
                                        cond,
                                        pixels: px.shallow_clone(),
                                        masks: s.req.masks.as_ref().map(Tensor::shallow_clone),
                                        timesteps: self.cfg.serve.csr_timesteps.clone(),
                                    });
                                }
                            }
                            s.state = SeqState::Ready(Feed::Prompt {
                                visual: Some(visual),
                            });
                        }
                    }
                }
            }
            Inbox::Drawn { seq, out } => {
                let Some(s) = self.seqs.get_mut(&seq) else {
                    return;
                };
                match out {
                    Err(e) => self.fail(seq, e),
                    Ok((pixels, png)) => {
                        self.metrics.generated_images.inc();
                        let _ = s.events.send(Ok(Event::Image(png)));
                        let masks = s.req.masks.as_ref().map(|_| {
                            deem::models::region::whole_image_masks(1, pixels.size()[1])
                                .to_device(pixels.device())
                        });
                        let _ = self.vision.send(VisionJob {
                            seq,
                            pixels: pixels.unsqueeze(0),
                            masks,
                            generated: true,
                        });
                    }
                }
            }
            Inbox::Scored { seq, out } => {
                let threshold = self.cfg.serve.ood_threshold;
                let Some(s) = self.seqs.get_mut(&seq) else {
                    return;
                };
                s.csr_pending = false;
                match out {
                    Err(e) => tracing::warn!(error = %e, "CSR scoring failed"),
                    Ok(scores) => {
                        let items: Vec<CsrScore> = scores
                            .iter()
                            .enumerate()
                            .map(|(index, &csr_loss)| {
                                self.metrics.csr_loss.observe(csr_loss);
                                let ood = threshold.map(|t| csr_loss > t);
                                if ood == Some(true) {
                                    self.metrics.ood_images.inc();
                                }
                                CsrScore {
                                    index,
                                    csr_loss,
                                    out_of_distribution: ood,
                                }
                            })
                            .collect();
                        let _ = s.events.send(Ok(Event::Csr(items)));
                    }
                }
                self.maybe_done(seq);
            }
        }
    }

    fn tick_result(&mut self, r: RowOut) {
        let owner = self.owner.get(&r.seq).copied().unwrap_or(r.seq);
        if self.seqs.get(&owner).is_some_and(|s| s.beam.is_some()) {
            self.beam_result(owner, r);
            return;
        }
        let (soi, eos) = (self.ids.soi, self.eos);
        let max_pos = self.cfg.llm.max_position_embeddings as usize;
        let k = self.k;
        let Some(s) = self.seqs.get_mut(&r.seq) else {
            return;
        };
        if let Some(ctx) = r.context {
            // The SoI went through: draw the image.
            s.state = SeqState::Drawing;
            let _ = self.diffusion.send(DiffusionJob::Draw {
                seq: r.seq,
                context: ctx,
                steps: s.req.ddim_steps,
                sampler: s.req.scheduler,
                guidance: s.req.guidance,
                seed: s.req.params.seed,
                image: s.images_drawn as u64 - 1,
            });
            return;
        }
        let Some(tok) = r.token else {
            return;
        };
        let now = Instant::now();
        match s.last_token {
            None => {
                self.metrics
                    .time_to_first_token_seconds
                    .observe((now - s.req.arrived).as_secs_f64());
                s.first_token = Some(now);
            }
            Some(prev) => self
                .metrics
                .inter_token_latency_seconds
                .observe((now - prev).as_secs_f64()),
        }
        s.last_token = Some(now);
        s.sampled += 1;
        self.metrics.generated_tokens.inc();
        let out_of_room = s.tokens.len() + 1 + if tok == soi { k } else { 0 } > max_pos;
        if tok == eos {
            self.finish(r.seq, "stop");
            return;
        }
        if tok == soi {
            self.flush_text(r.seq, true);
            let s = self.seqs.get_mut(&r.seq).expect("live sequence");
            if s.sampled as usize >= s.req.max_tokens || out_of_room {
                self.finish(r.seq, "length");
                return;
            }
            s.images_drawn += 1;
            s.text_ids.clear();
            s.sent = 0;
            s.state = SeqState::Ready(Feed::Token(soi));
            return;
        }
        s.text_ids.push(tok as u32);
        if self.flush_text(r.seq, false) {
            self.finish(r.seq, "stop");
            return;
        }
        let s = self.seqs.get_mut(&r.seq).expect("live sequence");
        if s.sampled as usize >= s.req.max_tokens || out_of_room {
            self.finish(r.seq, "length");
            return;
        }
        s.state = SeqState::Ready(Feed::Token(tok));
    }

    /// Sends the text decoded since the last flush. Holds back a possibly unfinished UTF-8 character
    /// and the tail that could start a stop string, unless `all`. Returns true when a stop string was
    /// found (the text before it is sent).
    pub(super) fn flush_text(&mut self, id: Uuid, all: bool) -> bool {
        let Some(s) = self.seqs.get_mut(&id) else {
            return false;
        };
        let text = self.tokenizer.decode(&s.text_ids, true).unwrap_or_default();
        let mut end = text.len();
        let mut stopped = false;
        if let Some(pos) = s
            .req
            .stop
            .iter()
            .filter_map(|st| text.find(st.as_str()))
            .min()
        {
            end = pos;
            stopped = true;
        } else if !all {
            if text.ends_with('\u{FFFD}') {
                end = text.trim_end_matches('\u{FFFD}').len();
            }
            let hold = s
                .req
                .stop
                .iter()
                .map(|x| x.len())
                .max()
                .unwrap_or(1)
                .saturating_sub(1);
            end = end.saturating_sub(hold);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
        }
        if end > s.sent {
            let _ = s
                .events
                .send(Ok(Event::Text(text[s.sent..end].to_string())));
            s.sent = end;
        }
        stopped
    }

    pub(super) fn finish(&mut self, id: Uuid, reason: &'static str) {
        // Sends what was held back (a found stop string is found again and cut again).
        self.flush_text(id, true);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.finish = Some(reason);
            s.state = SeqState::Drawing; // out of the decode rounds
        }
        self.maybe_done(id);
    }

    /// Sends `Done` once decoding ended and the CSR score (if asked for) arrived.
    pub(super) fn maybe_done(&mut self, id: Uuid) {
        let Some(s) = self.seqs.get(&id) else {
            return;
        };
        let (Some(reason), false) = (s.finish, s.csr_pending) else {
            return;
        };
        let _ = s.events.send(Ok(Event::Done {
            finish_reason: reason,
            prompt_tokens: s.req.prompt.len(),
            completion_tokens: s.sampled as usize,
        }));
        self.metrics
            .e2e_request_latency_seconds
            .observe(s.req.arrived.elapsed().as_secs_f64());
        self.drop_seq(id, reason);
    }

    pub(super) fn fail(&mut self, id: Uuid, error: InferError) {
        let outcome = match error {
            InferError::Timeout { .. } => "timeout",
            _ => "error",
        };
        if let Some(s) = self.seqs.get(&id) {
            let _ = s.events.send(Err(error));
        }
        self.drop_seq(id, outcome);
    }

    /// A worker died: every sequence in flight fails (its caches, images or pipeline place are gone),
    /// and a new epoch begins, so ticks still on their way are ignored. While the supervisor rebuilds
    /// the worker, queued requests wait; a worker failed for good fails the parked request and every
    /// one admitted from now on.
    fn worker_failed(&mut self, f: Failure) {
        let error = InferError::WorkerDied {
            actor: f.actor.clone(),
            error: f.error.clone(),
            restarting: f.restarting,
        };
        // One message frees them all: the first shard may be the dead one, its input bounded.
        let ids: Vec<Uuid> = self.seqs.keys().copied().collect();
        for id in ids {
            if let Some(s) = self.seqs.get(&id) {
                let _ = s.events.send(Err(error.clone()));
            }
            self.remove_seq(id, "error");
        }
        self.flush_frees();
        self.epoch += 1;
        for g in &mut self.groups {
            g.in_flight = false;
        }
        if f.restarting {
            if !self.down.contains(&f.actor) {
                self.down.push(f.actor.clone());
            }
            return;
        }
        self.failed = Some(f);
        if let Some(q) = self.parked.take() {
            self.admit(q);
        }
    }

    /// Removes a sequence and frees its caches on every shard.
    pub(super) fn drop_seq(&mut self, id: Uuid, outcome: &str) {
        self.remove_seq(id, outcome);
        self.flush_frees();
    }

    /// [`Self::drop_seq`], its caches' frees left for the next [`Self::flush_frees`].
    fn remove_seq(&mut self, id: Uuid, outcome: &str) {
        if let Some(s) = self.seqs.remove(&id) {
            self.groups[s.group].members -= 1;
            count(&self.metrics, outcome);
            self.to_free.push(id);
            for c in s.beam.iter().flat_map(|b| &b.caches) {
                if *c != id {
                    self.owner.remove(c);
                    self.to_free.push(*c);
                }
            }
        }
        self.metrics
            .num_requests_running
            .set(self.seqs.len() as i64);
    }

    pub(super) fn flush_frees(&mut self) {
        if !self.to_free.is_empty() {
            let _ = self
                .shard0
                .send(ShardIn::Free(std::mem::take(&mut self.to_free)));
        }
    }
}

enum Either {
    Inbox(Inbox),
    Request(Queued),
}
