//! Liveness, after torchelastic's agent heartbeats through its rendezvous store: every rank bumps a
//! counter of its own in the TCPStore each beat, from a thread of its own (so a long step still
//! beats). When a collective or a message between ranks fails, the counters that stopped moving name
//! the ranks that stopped answering — a process stopped (SIGSTOP), hung in the kernel, or on a lost host
//! — which Gloo's own "Operation timed out" cannot say.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::c10d::{Explain, Store};
use super::DistError;

type Result<T> = std::result::Result<T, DistError>;

/// This rank's heartbeat, and the reader of every rank's.
pub struct Liveness {
    reader: Store,
    prefix: String,
    rank: i64,
    size: i64,
    beat: Duration,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Liveness {
    /// Starts beating under `prefix` in the store at `host:port`: every `timeout / 10` (0.1 to 1 s).
    pub fn start(
        (host, port): (&str, u16),
        (rank, size): (i64, i64),
        prefix: &str,
        timeout: Duration,
    ) -> Result<Arc<Self>> {
        let beat = (timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        // The reader waits on the store at most a few beats: a store that does not answer is news.
        let connect = |t| Store::connect(host, port, false, rank, t);
        let (writer, reader) = (connect(timeout)?, connect(beat * 5)?);
        let key = format!("{prefix}/beat/{rank}");
        writer.add(&key, 1)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("deem-heartbeat".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(beat);
                        if writer.add(&key, 1).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| DistError::C10d {
                    rank,
                    op: "starting the heartbeat".into(),
                    message: e.to_string(),
                })?
        };
        Ok(Arc::new(Liveness {
            reader,
            prefix: prefix.to_string(),
            rank,
            size,
            beat,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    fn counts(&self) -> Result<Vec<i64>> {
        (0..self.size)
            .map(|r| self.reader.add(&format!("{}/beat/{r}", self.prefix), 0))
            .collect()
    }

    /// The other ranks whose heartbeat did not move over three beats.
    pub fn silent(&self) -> Result<Vec<i64>> {
        let before = self.counts()?;
        std::thread::sleep(self.beat * 3);
        let after = self.counts()?;
        Ok((0..self.size)
            .filter(|&r| r != self.rank && before[r as usize] == after[r as usize])
            .collect())
    }

    /// What a failed group operation's error adds: the ranks that stopped answering, or that the
    /// store (on rank 0, or torchrun's agent) does not answer either.
    pub fn explain(self: &Arc<Self>) -> Explain {
        let me = self.clone();
        Arc::new(move || {
            match me.silent() {
            Ok(s) if s.is_empty() => None,
            Ok(s) => Some(format!(
                "rank(s) {} stopped answering (no heartbeat in the store for {:.1} s)",
                s.iter().map(i64::to_string).collect::<Vec<_>>().join(", "),
                (me.beat * 3).as_secs_f64()
            )),
            Err(_) => Some(
                "the store does not answer either: its host (rank 0, or the launcher's agent) has stopped or is unreachable"
                    .into(),
            ),
        }
        })
    }
}

impl Liveness {
    fn stop_beating(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }

    /// A clean end: this rank stops beating and says so; rank 0, whose process hosts the store, then
    /// waits (at most `timeout`) until every rank has, so that no heartbeat meets a store that is gone.
    pub fn finish(&self, timeout: Duration) {
        self.stop_beating();
        let _ = self
            .reader
            .set(&format!("{}/done/{}", self.prefix, self.rank), b"1");
        if self.rank != 0 {
            return;
        }
        let keys: Vec<String> = (0..self.size)
            .map(|r| format!("{}/done/{r}", self.prefix))
            .collect();
        // A store that stops answering ends the wait as well.
        let _ = self.reader.wait_for(&keys, timeout);
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop_beating();
    }
}
