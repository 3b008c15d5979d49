//! Beam search in the scheduler, after transformers' `generate(num_beams=…)`: a beam-search request keeps
//! one KV cache per live hypothesis (each takes a slot); every step its rows return their best next ids
//! with log-probabilities, the search advances, the caches of hypotheses that continue twice are forked
//! (`Fork` down the shards) and those that ended are freed. The text is sent whole when the search ends.

use uuid::Uuid;

use super::messages::{RowInput, RowMeta, RowOut, SampleSpec, ShardIn};
use super::scheduler::{Feed, Scheduler, SeqState};

impl Scheduler {
    /// A beam-search sequence's rows: its prompt, or the newest id of every live hypothesis (each in its
    /// own cache). Each row asks for the candidates the search needs; `<|startofimage|>` is banned.
    pub(super) fn beam_rows(&mut self, id: Uuid) -> Vec<(RowMeta, RowInput)> {
        let (soi, sniffer) = (self.ids.soi, self.ids.sniffer);
        let s = self.seqs.get_mut(&id).expect("ready sequence");
        let beam = s.beam.as_ref().expect("a beam sequence");
        let need = beam.search.candidates_needed();
        let penalised = s.req.params.repetition_penalty != 1.0;
        // The context is only read by the repetition penalty: the prompt, then the hypothesis.
        let spec = |prompt: &[i64], generated: &[i64]| SampleSpec {
            params: s.req.params.clone(),
            seen: if penalised {
                prompt
                    .iter()
                    .chain(generated)
                    .copied()
                    .filter(|&t| t != sniffer)
                    .collect()
            } else {
                Vec::new()
            },
            banned: vec![sniffer, soi],
            index: 0,
            beam: need,
        };
        let rows = match std::mem::replace(&mut s.state, SeqState::InTick) {
            SeqState::Ready(Feed::Prompt { visual }) => {
                s.tokens.extend_from_slice(&s.req.prompt);
                self.metrics.prompt_tokens.inc_by(s.req.prompt.len() as u64);
                vec![(
                    RowMeta {
                        seq: id,
                        start: 0,
                        sample: Some(spec(&s.tokens, &[])),
                        context_from: None,
                    },
                    RowInput::Ids {
                        ids: s.req.prompt.clone(),
                        visual,
                    },
                )]
            }
            SeqState::Ready(Feed::Beams(next)) => {
                let live = beam.search.live();
                next.iter()
                    .zip(live)
                    .zip(&beam.caches)
                    .map(|((&t, h), &cache)| {
                        (
                            RowMeta {
                                seq: cache,
                                start: (s.tokens.len() + h.tokens.len() - 1) as i64,
                                sample: Some(spec(&s.tokens, &h.tokens)),
                                context_from: None,
                            },
                            RowInput::Ids {
                                ids: vec![t],
                                visual: None,
                            },
                        )
                    })
                    .collect()
            }
            _ => unreachable!("beam sequences feed their prompt, then hypotheses"),
        };
        rows
    }

    /// A beam row's candidates; once every live hypothesis reported, the search advances.
    pub(super) fn beam_result(&mut self, id: Uuid, r: RowOut) {
        let Some(beam) = self.seqs.get_mut(&id).and_then(|s| s.beam.as_mut()) else {
            return;
        };
        if let Some(i) = beam.caches.iter().position(|&c| c == r.seq) {
            beam.got[i] = Some(r.top);
        }
        if beam.got.iter().any(Option::is_none) {
            return;
        }
        let candidates: Vec<Vec<(i64, f64)>> = beam.got.drain(..).flatten().collect();
        let parents = beam.search.step(&candidates);
        if beam.search.is_done() {
            self.finish_beam(id);
            return;
        }
        // The first continuation of a hypothesis keeps its cache; a second one forks it; hypotheses
        // without continuations free theirs (before the forks, so their slots are free for them).
        let old = std::mem::take(&mut beam.caches);
        let mut kept = vec![false; old.len()];
        let mut forks = Vec::new();
        for &p in &parents {
            if !kept[p] {
                kept[p] = true;
                beam.caches.push(old[p]);
            } else {
                let fresh = Uuid::new_v4();
                forks.push((old[p], fresh));
                self.owner.insert(fresh, id);
                beam.caches.push(fresh);
            }
        }
        beam.got = vec![None; beam.caches.len()];
        let next = beam
            .search
            .live()
            .iter()
            .map(|h| *h.tokens.last().expect("a live hypothesis has an id"))
            .collect();
        for (c, k) in old.into_iter().zip(kept) {
            if !k {
                self.owner.remove(&c);
                self.to_free.push(c);
            }
        }
        self.flush_frees();
        if !forks.is_empty() {
            let _ = self.shard0.send(ShardIn::Fork(forks));
        }
        if let Some(s) = self.seqs.get_mut(&id) {
            s.state = SeqState::Ready(Feed::Beams(next));
        }
    }

    /// Sends the best hypothesis' text (cut at a stop string) and ends the request.
    pub(super) fn finish_beam(&mut self, id: Uuid) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let best = s
            .beam
            .as_ref()
            .and_then(|b| b.search.best().cloned())
            .unwrap_or(deem::text::sampling::Hypothesis {
                tokens: Vec::new(),
                log_prob: 0.0,
            });
        let ended = best.tokens.last() == Some(&self.eos);
        let text: Vec<u32> = best
            .tokens
            .iter()
            .filter(|&&t| t != self.eos)
            .map(|&t| t as u32)
            .collect();
        s.sampled = best.tokens.len() as u64;
        s.text_ids = text;
        self.metrics.generated_tokens.inc_by(s.sampled);
        self.metrics
            .time_to_first_token_seconds
            .observe(s.req.arrived.elapsed().as_secs_f64());
        let stopped = self.flush_text(id, true);
        self.finish(id, if ended || stopped { "stop" } else { "length" });
    }
}
