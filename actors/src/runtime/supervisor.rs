//! The supervisor, after ractor's (Erlang/OTP-style) supervision: it spawns every compute actor with
//! `spawn_linked`, hears each child's failure as a `SupervisionEvent` matched on the child's id, and owns
//! the restart policy. Training: a failed actor fails the step, and every actor is restarted from the
//! latest checkpoint, up to `train.max_restarts` times ([`Supervisor::restart_all`]). Serving: the failed
//! worker is marked failed and the owner is told ([`Policy::MarkFailed`]), which fails its in-flight
//! requests and turns `/ready` to 503.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};

use super::compute::{self, ComputeActor, ComputeHandle, ComputeSpec, ComputeStatus, Work};
use super::error::RuntimeError;
use super::metrics::{ActorLabels, Metrics};

/// What the supervisor does when a child fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Training: the step that was running fails, and [`Supervisor::restart_all`] restarts every actor
    /// from the latest checkpoint, at most `max_restarts` times in the supervisor's life.
    RestartAll { max_restarts: u32 },
    /// Serving: the child is marked failed and the owner's `on_failure` runs (it fails the requests in
    /// flight and makes the service unready); nothing is restarted.
    MarkFailed,
}

/// One child's failure, as the supervisor heard it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub actor: String,
    pub error: String,
}

/// Told of every failure (serving: fails in-flight requests, marks the service unready).
pub type OnFailure = Arc<dyn Fn(&Failure) + Send + Sync>;

struct Shared {
    name: String,
    policy: Policy,
    children: Mutex<HashMap<ActorId, String>>,
    failures: Mutex<Vec<Failure>>,
    restarts: AtomicU32,
    on_failure: Option<OnFailure>,
    metrics: Option<Arc<Metrics>>,
}

/// Only supervision events reach it.
pub enum Never {}

struct SupervisorActor;

impl Actor for SupervisorActor {
    type Msg = Never;
    type State = Arc<Shared>;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _me: ActorRef<Never>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Shared>, ActorProcessingErr> {
        Ok(shared)
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<Never>,
        event: SupervisionEvent,
        shared: &mut Arc<Shared>,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let id = cell.get_id();
                let actor = shared
                    .children
                    .lock()
                    .ok()
                    .and_then(|c| c.get(&id).cloned())
                    .unwrap_or_else(|| format!("an unregistered child ({id})"));
                let failure = Failure {
                    actor,
                    error: error.to_string(),
                };
                shared.record(failure);
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let id = cell.get_id();
                let name = shared.children.lock().ok().and_then(|mut c| c.remove(&id));
                tracing::debug!(supervisor = %shared.name, actor = ?name, ?reason, "actor stopped");
            }
            _ => {}
        }
        // Never stop with a child: the policy decides what happens next.
        Ok(())
    }
}

impl Shared {
    fn record(&self, failure: Failure) {
        tracing::error!(supervisor = %self.name, actor = %failure.actor, policy = ?self.policy,
            "actor failed: {}", failure.error);
        if let Some(m) = &self.metrics {
            m.actor_failures
                .get_or_create(&ActorLabels {
                    actor: failure.actor.clone(),
                })
                .inc();
        }
        // Recorded before the owner hears of it, so whatever the hook makes visible can name it.
        if let Ok(mut all) = self.failures.lock() {
            all.push(failure.clone());
        }
        if let Some(f) = &self.on_failure {
            f(&failure);
        }
    }
}

/// A running supervisor; its children are the compute actors it spawned.
pub struct Supervisor {
    actor: ActorRef<Never>,
    join: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Supervisor {
    /// Starts a supervisor named `name` (in logs) with `policy`; `on_failure` hears every failure and
    /// `metrics`, when given, counts them in `deem_actor_failures_total`.
    pub async fn start(
        name: &str,
        policy: Policy,
        on_failure: Option<OnFailure>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, RuntimeError> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            policy,
            children: Mutex::new(HashMap::new()),
            failures: Mutex::new(Vec::new()),
            restarts: AtomicU32::new(0),
            on_failure,
            metrics,
        });
        let (actor, join) = Actor::spawn(None, SupervisorActor, shared.clone())
            .await
            .map_err(|e| RuntimeError::Supervisor(e.to_string()))?;
        Ok(Supervisor {
            actor,
            join,
            shared,
        })
    }

    /// Spawns a compute actor linked to this supervisor; its work is built (on its own thread) before
    /// this returns.
    pub async fn spawn<W: Work>(
        &self,
        spec: ComputeSpec<W>,
    ) -> Result<ComputeHandle<W>, RuntimeError> {
        let name = spec.name.clone();
        let status: compute::Shared<W::Detail> = Arc::new(Mutex::new(ComputeStatus {
            name: name.clone(),
            device: spec.device.clone(),
            ..Default::default()
        }));
        let actor = ComputeActor::<W>(PhantomData);
        let args = (spec, status.clone());
        let (r, join) = Actor::spawn_linked(None, actor, args, self.actor.get_cell())
            .await
            .map_err(|e| spawn_error(&name, e))?;
        if let Ok(mut c) = self.shared.children.lock() {
            c.insert(r.get_id(), name.clone());
        }
        Ok(ComputeHandle::new(name, r, join, status))
    }

    /// Every failure heard so far, oldest first.
    /// Records a failure the supervisor could not see itself (a worker in another process, a lost
    /// peer) exactly as one of its children's: logged, counted, kept, and told to the owner.
    pub fn reporter(&self) -> Arc<dyn Fn(&Failure) + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |f: &Failure| shared.record(f.clone()))
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.shared
            .failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    /// Restarts done under [`Policy::RestartAll`].
    pub fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::SeqCst)
    }

    /// Training's policy after a failed step (`failed` says how it failed): takes one restart from the
    /// budget and runs `restart` (stop every actor, spawn them afresh under this supervisor, restore the
    /// latest checkpoint), returning what it returns. With the budget spent, or under
    /// [`Policy::MarkFailed`], nothing restarts and the failure is returned.
    pub async fn restart_all<T, E, F, Fut>(&self, failed: String, restart: F) -> Result<T, E>
    where
        E: From<RuntimeError>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let max = match self.shared.policy {
            Policy::RestartAll { max_restarts } => max_restarts,
            Policy::MarkFailed => 0,
        };
        let done = self.shared.restarts.load(Ordering::SeqCst);
        if done >= max {
            return Err(RuntimeError::RestartsExhausted { max, failed }.into());
        }
        self.shared.restarts.store(done + 1, Ordering::SeqCst);
        if let Some(m) = &self.shared.metrics {
            m.train_restarts.inc();
        }
        tracing::error!(supervisor = %self.shared.name, restart = done + 1, max,
            "restarting every actor from the latest checkpoint after: {failed}");
        restart().await
    }

    /// Stops the supervisor (its children must have been stopped through their handles first).
    pub async fn stop(self) {
        self.actor.stop(None);
        let _ = self.join.await;
    }
}

/// The compute actor's own error when its start failed, else ractor's.
fn spawn_error(name: &str, e: SpawnErr) -> RuntimeError {
    match e {
        SpawnErr::StartupFailed(inner) => match inner.downcast::<RuntimeError>() {
            Ok(own) => *own,
            Err(other) => RuntimeError::Spawn {
                actor: name.to_string(),
                message: other.to_string(),
            },
        },
        other => RuntimeError::Spawn {
            actor: name.to_string(),
            message: other.to_string(),
        },
    }
}
