//! The compute actor, after ractor's actor model with tensor work kept off the async runtime: a ractor
//! actor that owns one named compute thread (its intra-op thread budget, its device), builds the work on
//! that thread before it reports ready, forwards work messages to it, answers status, and fails — so its
//! supervisor hears of it — when the thread dies. Every training stage and every serving worker is one.
//! The actor is generic over the work: a [`Work`] type the stage or worker supplies.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::error::RuntimeError;

/// Why building a work failed (any error: a model's, a checkpoint's, a message).
pub type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// The detail of a work that publishes no counters of its own.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct NoDetail {}

/// What a compute thread runs once built.
pub trait Work: Send + 'static {
    /// The messages the actor forwards to the thread.
    type Msg: Send + 'static;
    /// Counters the work publishes in its status beside the runtime's own (serialised flat into it).
    type Detail: Clone + Default + Send + serde::Serialize + 'static;

    /// Runs on the compute thread until `inbox` closes (the actor stopped) or the work's own inputs do.
    fn run(self, inbox: flume::Receiver<Self::Msg>, ctx: ComputeCtx<Self::Detail>);
}

/// Where an actor's compute thread is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeState {
    #[default]
    Starting,
    Running,
    /// The thread died (a panic); its supervisor has been told.
    Failed,
    Stopped,
}

/// What an actor reports about its compute thread.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ComputeStatus<D> {
    pub name: String,
    pub device: String,
    pub state: ComputeState,
    /// Jobs the work has counted (see [`ComputeCtx::job`]).
    pub jobs: u64,
    /// Why it failed, once it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub detail: D,
}

pub(super) type Shared<D> = Arc<Mutex<ComputeStatus<D>>>;

fn with_status<D, T>(s: &Shared<D>, f: impl FnOnce(&mut ComputeStatus<D>) -> T) -> Option<T> {
    s.lock().ok().map(|mut g| f(&mut g))
}

/// The compute thread's view of its actor: its name, status and fault hook.
pub struct ComputeCtx<D> {
    name: String,
    status: Shared<D>,
    fault_at_job: Option<u64>,
}

impl<D> ComputeCtx<D> {
    /// Counts one job. With a fault configured for this actor at this job ([`ComputeSpec::fault_at_job`],
    /// 0-based), the compute thread panics instead: the supervisor's failure path, rehearsed.
    pub fn job(&self) {
        let n = with_status(&self.status, |s| {
            s.jobs += 1;
            s.jobs - 1
        })
        .unwrap_or(0);
        if self.fault_at_job == Some(n) {
            self.fail(&format!("job {n}"));
        }
    }

    /// Fault injection: the compute thread panics now.
    pub fn fail(&self, at: &str) -> ! {
        panic!("fault injection: actor {} killed at {at}", self.name)
    }

    /// Updates the work's own counters.
    pub fn detail(&self, f: impl FnOnce(&mut D)) {
        with_status(&self.status, |s| f(&mut s.detail));
    }
}

/// How to start one compute actor.
pub struct ComputeSpec<W: Work> {
    pub name: String,
    /// Shown in status (`cpu`, `cuda:0`).
    pub device: String,
    /// Intra-op threads of the compute thread (`None`: libtorch's default); see
    /// [`super::topology::Topology::cpu_threads`].
    pub threads: Option<i32>,
    /// Builds the work on the compute thread; the actor is up once it returns `Ok`.
    pub build: Box<dyn FnOnce() -> Result<W, BuildError> + Send>,
    /// Fault injection: panic at this job (0-based); `None` in normal runs.
    pub fault_at_job: Option<u64>,
}

/// Messages of a compute actor.
pub enum ComputeMsg<M, D> {
    /// Forwarded to the compute thread.
    Work(M),
    Status(RpcReplyPort<ComputeStatus<D>>),
    /// From the compute thread as it ends: `Some(reason)` when it panicked.
    Exited(Option<String>),
}

/// The actor itself; one per compute thread.
pub struct ComputeActor<W>(pub(super) PhantomData<fn() -> W>);

pub struct ComputeActorState<W: Work> {
    commands: Option<flume::Sender<W::Msg>>,
    thread: Option<std::thread::JoinHandle<()>>,
    status: Shared<W::Detail>,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

impl<W: Work> Actor for ComputeActor<W> {
    type Msg = ComputeMsg<W::Msg, W::Detail>;
    type State = ComputeActorState<W>;
    /// The spec, and the status the actor shares with its handle (readable after the actor died).
    type Arguments = (ComputeSpec<W>, Shared<W::Detail>);

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        (spec, status): (ComputeSpec<W>, Shared<W::Detail>),
    ) -> Result<Self::State, ActorProcessingErr> {
        let (tx, rx) = flume::unbounded::<W::Msg>();
        let (ready_tx, ready_rx) = flume::bounded::<Result<(), BuildError>>(1);
        let ctx = ComputeCtx {
            name: spec.name.clone(),
            status: status.clone(),
            fault_at_job: spec.fault_at_job,
        };
        let (build, threads, name) = (spec.build, spec.threads, spec.name.clone());
        // Tensor work runs on this thread, never on tokio's workers.
        let thread = std::thread::Builder::new()
            .name(format!("deem-{name}"))
            .spawn(move || {
                if let Some(n) = threads {
                    tch::set_num_threads(n);
                }
                let work = match catch_unwind(AssertUnwindSafe(build)) {
                    Ok(Ok(w)) => w,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    // The ready channel drops unanswered: "died while building".
                    Err(_) => return,
                };
                let _ = ready_tx.send(Ok(()));
                let ended = catch_unwind(AssertUnwindSafe(|| work.run(rx, ctx)));
                let _ = me.send_message(ComputeMsg::Exited(ended.err().map(|p| panic_text(&*p))));
            })
            .map_err(|source| RuntimeError::Thread {
                actor: name.clone(),
                source,
            })?;
        match ready_rx.recv_async().await {
            Ok(Ok(())) => {
                with_status(&status, |s| s.state = ComputeState::Running);
                Ok(ComputeActorState {
                    commands: Some(tx),
                    thread: Some(thread),
                    status,
                })
            }
            Ok(Err(e)) => Err(RuntimeError::Build {
                actor: name,
                message: e.to_string(),
            }
            .into()),
            Err(_) => Err(RuntimeError::DiedBuilding { actor: name }.into()),
        }
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let name = || with_status(&state.status, |s| s.name.clone()).unwrap_or_default();
        match msg {
            ComputeMsg::Work(m) => {
                let sent = state.commands.as_ref().map(|c| c.send(m).is_ok());
                if sent != Some(true) {
                    return Err(RuntimeError::Call {
                        actor: name(),
                        message: "the compute thread has stopped".into(),
                    }
                    .into());
                }
            }
            ComputeMsg::Status(reply) => {
                if let Some(s) = with_status(&state.status, |s| s.clone()) {
                    let _ = reply.send(s);
                }
            }
            ComputeMsg::Exited(None) => {
                with_status(&state.status, |s| s.state = ComputeState::Stopped);
                me.stop(Some("the compute thread finished".into()));
            }
            ComputeMsg::Exited(Some(reason)) => {
                let message = format!("the compute thread died: {reason}");
                with_status(&state.status, |s| {
                    s.state = ComputeState::Failed;
                    s.error = Some(message.clone());
                });
                // Failing the actor is how its supervisor hears of it.
                return Err(RuntimeError::Work {
                    actor: name(),
                    message,
                }
                .into());
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Closing the inbox ends a message-driven loop; a loop on its own inputs ends when they close.
        state.commands = None;
        if let Some(t) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        with_status(&state.status, |s| {
            if s.state != ComputeState::Failed {
                s.state = ComputeState::Stopped;
            }
        });
        Ok(())
    }
}

/// A typed handle to a compute actor.
pub struct ComputeHandle<W: Work> {
    pub name: String,
    actor: ActorRef<ComputeMsg<W::Msg, W::Detail>>,
    join: Option<tokio::task::JoinHandle<()>>,
    status: Shared<W::Detail>,
}

impl<W: Work> std::fmt::Debug for ComputeHandle<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeHandle")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<W: Work> Clone for ComputeHandle<W> {
    /// Another handle to the same actor (only the first one waits for it in [`Self::stop`]).
    fn clone(&self) -> Self {
        ComputeHandle {
            name: self.name.clone(),
            actor: self.actor.clone(),
            join: None,
            status: self.status.clone(),
        }
    }
}

impl<W: Work> ComputeHandle<W> {
    pub(super) fn new(
        name: String,
        actor: ActorRef<ComputeMsg<W::Msg, W::Detail>>,
        join: tokio::task::JoinHandle<()>,
        status: Shared<W::Detail>,
    ) -> Self {
        ComputeHandle {
            name,
            actor,
            join: Some(join),
            status,
        }
    }

    pub(super) fn id(&self) -> ractor::ActorId {
        self.actor.get_id()
    }

    /// Sends a message to the compute thread.
    pub fn send(&self, msg: W::Msg) -> Result<(), RuntimeError> {
        self.actor
            .send_message(ComputeMsg::Work(msg))
            .map_err(|e| self.call_error(e))
    }

    /// Sends the message `make` builds around a reply port and waits for the answer.
    pub async fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(RpcReplyPort<T>) -> W::Msg,
    ) -> Result<T, RuntimeError> {
        let (tx, rx) = ractor::concurrency::oneshot();
        self.send(make(tx.into()))?;
        rx.await.map_err(|_| RuntimeError::Call {
            actor: self.name.clone(),
            message: "the compute thread stopped before it answered".into(),
        })
    }

    /// The actor's status, asked through its mailbox; once the actor is gone, the last status it
    /// shared (a failed one says why).
    pub async fn status(&self) -> ComputeStatus<W::Detail> {
        match ractor::call!(self.actor, ComputeMsg::Status) {
            Ok(s) => s,
            Err(_) => {
                let mut s = with_status(&self.status, |s| s.clone()).unwrap_or_default();
                if s.state != ComputeState::Failed {
                    s.state = ComputeState::Stopped;
                }
                s
            }
        }
    }

    fn call_error(&self, e: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Call {
            actor: self.name.clone(),
            message: format!("the actor has stopped ({e})"),
        }
    }

    /// Stops the actor and waits for its compute thread.
    pub async fn stop(mut self) {
        self.actor.stop(None);
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use ractor::RpcReplyPort;

    use super::{ComputeCtx, ComputeSpec, ComputeState, NoDetail, Work};
    use crate::runtime::{Failure, Policy, Report, RuntimeError, Supervisor};

    /// Doubles numbers; panics on a negative one (the supervisor's tests use it too).
    pub(crate) struct Echo;

    impl Work for Echo {
        type Msg = (i64, RpcReplyPort<i64>);
        type Detail = NoDetail;

        fn run(self, inbox: flume::Receiver<Self::Msg>, ctx: ComputeCtx<NoDetail>) {
            while let Ok((x, reply)) = inbox.recv() {
                ctx.job();
                assert!(x >= 0, "boom: {x}");
                let _ = reply.send(x * 2);
            }
        }
    }

    fn spec(name: &str, build: Result<(), &'static str>) -> ComputeSpec<Echo> {
        ComputeSpec {
            name: name.into(),
            device: "cpu".into(),
            threads: None,
            build: Box::new(move || build.map(|_| Echo).map_err(Into::into)),
            fault_at_job: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compute_actor_answers_counts_its_jobs_and_stops_its_thread() {
        let sup = Supervisor::start("test", Policy::MarkFailed, None, None)
            .await
            .unwrap();
        let a = sup.spawn(spec("echo", Ok(()))).await.unwrap();
        assert_eq!(a.call(|r| (21, r)).await.unwrap(), 42);
        assert_eq!(a.call(|r| (2, r)).await.unwrap(), 4);
        let s = a.status().await;
        assert_eq!(
            (s.name.as_str(), s.state, s.jobs),
            ("echo", ComputeState::Running, 2)
        );
        let other = a.clone();
        a.stop().await;
        assert_eq!(other.status().await.state, ComputeState::Stopped);
        let err = other.call(|r| (1, r)).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("actor echo: the actor has stopped"),
            "{err}"
        );
        sup.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_error_fails_the_spawn_naming_the_actor() {
        let sup = Supervisor::start("test", Policy::MarkFailed, None, None)
            .await
            .unwrap();
        let err = sup
            .spawn(spec("vision", Err("no weights for visual.trunk")))
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Build { .. }), "{err:?}");
        assert_eq!(err.to_string(), "actor vision: no weights for visual.trunk");
        sup.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_compute_thread_is_marked_failed_and_its_supervisor_hears_of_it() {
        let heard: Arc<Mutex<Vec<Failure>>> = Arc::default();
        let hook = {
            let heard = heard.clone();
            Arc::new(move |r: &Report| {
                if let Report::Failed(f) = r {
                    heard.lock().unwrap().push(f.clone())
                }
            })
        };
        let sup = Supervisor::start("test", Policy::MarkFailed, Some(hook), None)
            .await
            .unwrap();
        let a = sup.spawn(spec("llm1", Ok(()))).await.unwrap();
        let err = a.call(|r| (-1, r)).await.unwrap_err();
        assert!(
            err.to_string().contains("stopped before it answered"),
            "{err}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while heard.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let heard = heard.lock().unwrap().clone();
        assert_eq!(heard.len(), 1);
        assert_eq!(heard[0].actor, "llm1");
        assert!(
            heard[0]
                .error
                .starts_with("actor llm1: the compute thread died: boom: -1"),
            "{heard:?}"
        );
        assert_eq!(sup.failures(), heard);
        let s = a.status().await;
        assert_eq!(s.state, ComputeState::Failed);
        assert_eq!(
            s.error.as_deref(),
            Some("the compute thread died: boom: -1")
        );
        // The supervisor outlives its child and spawns again.
        let b = sup.spawn(spec("llm1", Ok(()))).await.unwrap();
        assert_eq!(b.call(|r| (5, r)).await.unwrap(), 10);
        b.stop().await;
        sup.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_restart_budget_bounds_restart_all() {
        let sup = Supervisor::start("test", Policy::RestartAll { max_restarts: 1 }, None, None)
            .await
            .unwrap();
        let first: Result<u64, RuntimeError> = sup
            .restart_all("step 3 failed".into(), || async { Ok(2) })
            .await;
        assert_eq!(first.unwrap(), 2);
        assert_eq!(sup.restarts(), 1);
        let ran = Arc::new(Mutex::new(false));
        let second: Result<u64, RuntimeError> = sup
            .restart_all("step 5 failed".into(), || {
                let ran = ran.clone();
                async move {
                    *ran.lock().unwrap() = true;
                    Ok(4)
                }
            })
            .await;
        assert_eq!(
            second.unwrap_err().to_string(),
            "step 5 failed; not restarting: all 1 restarts allowed (train.max_restarts) are used"
        );
        assert!(!*ran.lock().unwrap(), "a refused restart runs nothing");
        sup.stop().await;
        let serving = Supervisor::start("test", Policy::MarkFailed, None, None)
            .await
            .unwrap();
        let refused: Result<u64, RuntimeError> =
            serving.restart_all("x".into(), || async { Ok(0) }).await;
        assert!(matches!(
            refused,
            Err(RuntimeError::RestartsExhausted { max: 0, .. })
        ));
        serving.stop().await;
    }
}
