//! Admission, after text-generation-inference's queue: where a validated request waits before the
//! scheduler runs it. The queue is bounded (`serve.queue_capacity`): a request that finds it full is
//! refused at once (HTTP 429 with `Retry-After`), one that comes while the service is unready or
//! shutting down gets 503. The scheduler takes requests between ticks while KV slots are free.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use flume::{Receiver, Sender, TrySendError};

use super::error::{InferError, ServeError};
use super::events::{Event, Events};
use super::validation::ValidRequest;
use crate::runtime::metrics::ServeMetrics;

/// A request waiting for admission, with the sending end of its stream.
pub struct Queued {
    pub req: ValidRequest,
    pub events: Sender<Result<Event, InferError>>,
}

/// The front of the queue: requests go in here.
pub struct Admission {
    tx: Option<Sender<Queued>>,
    capacity: usize,
    waiting: Arc<AtomicUsize>,
    /// False once a worker has failed (its supervisor said so): new requests get 503.
    healthy: Arc<AtomicBool>,
    metrics: ServeMetrics,
}

/// The scheduler's end of the queue.
pub struct AdmissionQueue {
    pub rx: Receiver<Queued>,
    waiting: Arc<AtomicUsize>,
    metrics: ServeMetrics,
}

impl Admission {
    /// A queue of `capacity` requests; `healthy` is shared with the supervisor's failure hook.
    pub fn new(
        capacity: usize,
        healthy: Arc<AtomicBool>,
        metrics: ServeMetrics,
    ) -> (Self, AdmissionQueue) {
        let (tx, rx) = flume::bounded::<Queued>(capacity);
        let waiting = Arc::new(AtomicUsize::new(0));
        let queue = AdmissionQueue {
            rx,
            waiting: waiting.clone(),
            metrics: metrics.clone(),
        };
        let front = Admission {
            tx: Some(tx),
            capacity,
            waiting,
            healthy,
            metrics,
        };
        (front, queue)
    }

    /// Queues `req`; its stream is the returned receiver. Dropping the receiver cancels the request.
    pub fn submit(
        &self,
        req: ValidRequest,
        unready: impl FnOnce() -> String,
    ) -> Result<Events, ServeError> {
        let tx = self.tx.as_ref().ok_or(ServeError::ShuttingDown)?;
        if !self.healthy.load(Ordering::SeqCst) {
            return Err(ServeError::Unavailable(unready()));
        }
        let (etx, erx) = flume::unbounded();
        // Counted before the send, so the scheduler never admits a request not yet counted.
        let n = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.num_requests_waiting.set(n as i64);
        let refused = match tx.try_send(Queued { req, events: etx }) {
            Ok(()) => return Ok(erx),
            Err(TrySendError::Full(_)) => ServeError::QueueFull {
                capacity: self.capacity,
            },
            Err(TrySendError::Disconnected(_)) => ServeError::ShuttingDown,
        };
        let n = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.num_requests_waiting.set(n as i64);
        Err(refused)
    }

    /// Takes no more requests; the scheduler ends once the queued and running ones are done.
    pub fn close(&mut self) {
        self.tx = None;
    }
}

impl AdmissionQueue {
    /// The scheduler took a request off the queue.
    pub fn taken(&self) {
        let n = self
            .waiting
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        self.metrics.num_requests_waiting.set(n as i64);
    }
}
