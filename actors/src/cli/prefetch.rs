//! Background batch preparation, after PyTorch's `DataLoader` (`num_workers`, `prefetch_factor`):
//! `train.data_workers` threads build batches `k + 1, k + 2, …` while the trainer runs step `k`, at
//! most `train.prefetch` ahead (a bounded set of tickets: memory holds that many batches, whatever the
//! dataset's size). Batch `k` is a function of the seed and `k` alone, so the batches are the same
//! whatever the number of workers; a trainer that asks for another index than the next (a restart
//! from a checkpoint) gets the pipeline restarted there.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use deem::models::deem::Batch;

use crate::cli::train_data::Batches;
use crate::runtime::metrics::Metrics;

type Built = (u64, anyhow::Result<Batch>);

struct Running {
    /// The index the trainer takes next.
    next: u64,
    /// The next ticket to hand out.
    issued: u64,
    tickets: Option<Sender<u64>>,
    results: Receiver<Built>,
    ready: BTreeMap<u64, anyhow::Result<Batch>>,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    fn stop(mut self) {
        // Workers end when the ticket channel closes (results are unbounded: no send blocks).
        self.tickets = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Batches built ahead by worker threads, handed out in order.
pub struct Prefetcher {
    source: Arc<dyn Batches>,
    rows: Range<usize>,
    workers: usize,
    depth: usize,
    running: Option<Running>,
}

/// What [`Prefetcher::get`] waited and what was ready.
pub struct Took {
    pub batch: Batch,
    /// How long the trainer waited for it.
    pub waited: Duration,
    /// Batches ready after it was taken.
    pub ready: usize,
}

impl Prefetcher {
    /// `workers` threads (0: build in the caller's thread), `depth` batches ahead; each batch's rows
    /// `rows` are this process's share (the others' images are not decoded).
    pub fn new(source: Arc<dyn Batches>, rows: Range<usize>, workers: usize, depth: usize) -> Self {
        Prefetcher {
            source,
            rows,
            workers,
            depth: depth.max(1),
            running: None,
        }
    }

    fn start(&self, at: u64) -> anyhow::Result<Running> {
        let (tickets, ticket_rx) = crossbeam_channel::bounded::<u64>(self.depth);
        let (results_tx, results) = crossbeam_channel::unbounded::<Built>();
        let threads = (0..self.workers)
            .map(|w| {
                let (rx, tx, source, rows) = (
                    ticket_rx.clone(),
                    results_tx.clone(),
                    self.source.clone(),
                    self.rows.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("deem-data-{w}"))
                    .spawn(move || {
                        while let Ok(k) = rx.recv() {
                            let b = source.batch_rows(k, rows.clone());
                            if tx.send((k, b)).is_err() {
                                break;
                            }
                        }
                    })
                    .map_err(|e| anyhow::anyhow!("cannot start data worker {w}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut r = Running {
            next: at,
            issued: at,
            tickets: Some(tickets),
            results,
            ready: BTreeMap::new(),
            threads,
        };
        for _ in 0..self.depth {
            issue(&mut r);
        }
        Ok(r)
    }

    /// Batch `index`: from the workers (waiting for it if it is not ready), or built here without
    /// workers.
    pub fn get(&mut self, index: u64) -> anyhow::Result<Took> {
        let started = Instant::now();
        if self.workers == 0 {
            let batch = self.source.batch_rows(index, self.rows.clone())?;
            let waited = started.elapsed();
            return Ok(Took {
                batch,
                waited,
                ready: 0,
            });
        }
        if self.running.as_ref().is_none_or(|r| r.next != index) {
            if let Some(r) = self.running.take() {
                r.stop();
            }
            self.running = Some(self.start(index)?);
        }
        let r = self.running.as_mut().expect("started above");
        let batch = loop {
            if let Some(b) = r.ready.remove(&index) {
                break b;
            }
            match r.results.recv() {
                Ok((k, b)) => {
                    r.ready.insert(k, b);
                }
                Err(_) => anyhow::bail!("the data workers stopped before batch {index}"),
            }
        };
        let waited = started.elapsed();
        r.next = index + 1;
        issue(r);
        while let Ok((k, b)) = r.results.try_recv() {
            r.ready.insert(k, b);
        }
        Ok(Took {
            batch: batch?,
            waited,
            ready: r.ready.len(),
        })
    }
}

fn issue(r: &mut Running) {
    if let Some(t) = &r.tickets {
        if t.try_send(r.issued).is_ok() {
            r.issued += 1;
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

/// The trainer's batches: datasets through the data workers (`train.data_workers`,
/// `train.prefetch`), the built-in batches in the trainer's thread; the data metrics kept.
pub struct Feed {
    prefetcher: Prefetcher,
    stats: Option<Arc<deem::data::stream::DataStats>>,
    /// The stats' values at the last sync.
    synced: [u64; 5],
}

impl Feed {
    pub fn new(data: Arc<dyn Batches>, rows: Range<usize>, c: &deem::config::DeemConfig) -> Self {
        let stats = data.stats();
        let workers = if stats.is_some() {
            c.train.data_workers
        } else {
            0
        };
        Feed {
            prefetcher: Prefetcher::new(data, rows, workers, c.train.prefetch),
            stats,
            synced: [0; 5],
        }
    }

    /// Batch `index`; records how long the trainer waited, what is ready, what was read and decoded,
    /// and logs the latest unreadable record or image.
    pub fn take(&mut self, index: u64, metrics: &Metrics) -> anyhow::Result<Batch> {
        let took = self.prefetcher.get(index)?;
        metrics.data.wait_seconds.inc_by(took.waited.as_secs_f64());
        metrics.data.queue_depth.set(took.ready as i64);
        if let Some(s) = &self.stats {
            metrics.data.sync(s, &mut self.synced);
            if let Some(problem) = s.take_problem() {
                tracing::warn!(%problem, "training data");
            }
        }
        Ok(took.batch)
    }
}
