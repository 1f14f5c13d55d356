//! The embedded runtime for `tidings serve`: an in-process delivery queue, a bounded worker pool
//! and the sweep loop, all over the same use cases the Lambda functions run.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::app::{App, DeliverOutcome};
use crate::ports::{Clock, DeliveryQueue, Job, QueueError, Store};
use crate::sender::HttpSender;

/// Like SQS's 15-minute cap: longer waits stay in the store for the sweep, so memory stays bounded.
pub const LOCAL_MAX_DELAY: Duration = Duration::from_secs(15 * 60);

/// An in-memory queue. Messages are lost with the process, which is fine: the store is the
/// source of truth and the sweep re-sends whatever was due.
#[derive(Clone)]
pub struct LocalQueue {
    tx: mpsc::UnboundedSender<Job>,
}

/// The receiving end, handed to [`spawn_workers`].
pub struct LocalJobs {
    rx: mpsc::UnboundedReceiver<Job>,
}

impl LocalQueue {
    pub fn new() -> (Self, LocalJobs) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, LocalJobs { rx })
    }
}

impl DeliveryQueue for LocalQueue {
    fn max_delay(&self) -> Duration {
        LOCAL_MAX_DELAY
    }

    async fn enqueue(&self, jobs: Vec<(Job, Duration)>) -> Result<(), QueueError> {
        for (job, delay) in jobs {
            if delay.is_zero() {
                self.tx
                    .send(job)
                    .map_err(|_| QueueError("local queue closed".into()))?;
            } else {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // A closed queue means shutdown; the store still has the delivery.
                    let _ = tx.send(job);
                });
            }
        }
        Ok(())
    }
}

/// Runs every queued job through `App::deliver` or `App::fan_out`, at most `concurrency` at a
/// time.
pub fn spawn_workers<S, Q, C, H>(
    app: Arc<App<S, Q, C>>,
    sender: Arc<H>,
    mut jobs: LocalJobs,
    concurrency: usize,
) -> JoinHandle<()>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
    H: HttpSender,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    tokio::spawn(async move {
        while let Some(job) = jobs.rx.recv().await {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let app = Arc::clone(&app);
            let sender = Arc::clone(&sender);
            tokio::spawn(async move {
                let _permit = permit;
                let job = match job {
                    Job::FanOut(job) => {
                        // Should it fail, the event's fan-out is due in the store: the sweep
                        // sends it again.
                        if let Err(e) = app.fan_out(sender.as_ref(), &job, None, None).await {
                            tracing::error!(error = %e, event = %job.event_id, "fan-out failed");
                        }
                        return;
                    }
                    Job::Deliver(job) => job,
                };
                match app.deliver(sender.as_ref(), &job).await {
                    Ok(DeliverOutcome::NotDue(at)) => {
                        let delay = app.clock.now().until(at);
                        if let Err(e) = app.queue.enqueue(vec![(job.into(), delay)]).await {
                            tracing::warn!(error = %e, "could not requeue an early job");
                        }
                    }
                    Ok(_) => {}
                    // The delivery's due time is in the store: the sweep retries it.
                    Err(e) => {
                        tracing::error!(error = %e, delivery = %job.delivery_id, "deliver failed")
                    }
                }
            });
        }
    })
}

/// Sweeps every `interval`, draining a backlog in batches.
pub fn spawn_sweeper<S, Q, C>(app: Arc<App<S, Q, C>>, interval: Duration) -> JoinHandle<()>
where
    S: Store,
    Q: DeliveryQueue,
    C: Clock,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            loop {
                match app.sweep_due().await {
                    Ok(report) => {
                        if report.enqueued > 0 {
                            tracing::info!(
                                enqueued = report.enqueued,
                                "sweep re-sent due deliveries"
                            );
                        }
                        if !report.more_may_be_due(app.config.sweep_batch) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "sweep failed");
                        break;
                    }
                }
            }
        }
    })
}

#[cfg(feature = "sqlite")]
pub use server::{LocalServer, LocalServerConfig, StartError, prepare_data_dir};

#[cfg(feature = "sqlite")]
mod server {
    use std::fs::{File, OpenOptions};
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::{LocalQueue, spawn_sweeper, spawn_workers};
    use crate::app::{App, AppConfig, AppError, FanOutTrigger};
    use crate::domain::TenantId;
    use crate::egress::EgressPolicy;
    use crate::ports::{StoreError, SystemClock};
    use crate::retry::{self, RetrySchedule};
    use crate::sender::{
        HostResolver, ReqwestSender, SenderBuildError, SenderConfig, SystemResolver,
    };
    use crate::sqlite::SqliteStore;

    pub const DEFAULT_TENANT: &str = "default";

    /// Everything `tidings serve` can be told.
    #[derive(Clone)]
    pub struct LocalServerConfig {
        pub listen: SocketAddr,
        pub data_dir: PathBuf,
        /// The default tenant's key; generated (and kept in the data dir) when absent.
        pub api_key: Option<String>,
        pub schedule: RetrySchedule,
        pub egress: EgressPolicy,
        pub workers: usize,
        pub sweep_interval: Duration,
        pub sweep_grace: Duration,
        pub request_timeout: Duration,
        /// Tests inject a resolver to map names to addresses without DNS.
        pub resolver: Arc<dyn HostResolver>,
        /// See [`SenderConfig::local_address`].
        pub sender_local_address: Option<std::net::IpAddr>,
    }

    impl LocalServerConfig {
        pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
            Self {
                listen,
                data_dir,
                api_key: None,
                schedule: RetrySchedule::default(),
                egress: EgressPolicy::local_development(),
                workers: 64,
                sweep_interval: Duration::from_secs(1),
                sweep_grace: Duration::from_secs(30),
                request_timeout: Duration::from_secs(15),
                resolver: Arc::new(SystemResolver),
                sender_local_address: None,
            }
        }
    }

    #[derive(Debug, thiserror::Error)]
    pub enum StartError {
        #[error("data directory {path}: {source}")]
        DataDir {
            path: PathBuf,
            #[source]
            source: std::io::Error,
        },
        #[error(
            "data directory {0} is in use by another `tidings serve`; stop it or pick another --data-dir"
        )]
        Locked(PathBuf),
        #[error(transparent)]
        Store(#[from] StoreError),
        #[error(transparent)]
        App(#[from] AppError),
        #[error(transparent)]
        Sender(#[from] SenderBuildError),
        #[error("cannot listen on {addr}: {source}")]
        Listen {
            addr: SocketAddr,
            #[source]
            source: std::io::Error,
        },
    }

    /// A running all-in-one server.
    pub struct LocalServer {
        pub addr: SocketAddr,
        pub api_key: String,
        /// Whether `api_key` was generated (and saved) rather than given.
        pub api_key_generated: bool,
        pub db_path: PathBuf,
        tasks: Vec<JoinHandle<()>>,
        _lock: File,
    }

    /// Creates the data directory and its database file for their owner alone (the database
    /// holds subscription secrets and API key hashes): a new directory `0700`, the database file
    /// `0600` (SQLite gives its WAL and shared-memory files the database's permissions). An
    /// existing directory keeps its permissions. Returns the database's path.
    pub fn prepare_data_dir(dir: &Path) -> std::io::Result<PathBuf> {
        let new_dir = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let db = dir.join("tidings.db");
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            if new_dir {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&db)?;
            std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))?;
        }
        #[cfg(not(unix))]
        let _ = new_dir;
        Ok(db)
    }

    fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
        move |source| StartError::DataDir {
            path: path.to_owned(),
            source,
        }
    }

    /// The default tenant's key: the one given, else the one saved by an earlier start, else new.
    fn default_key(data_dir: &Path, given: Option<String>) -> Result<(String, bool), StartError> {
        if let Some(key) = given {
            return Ok((key, false));
        }
        let path = data_dir.join("api-key");
        match std::fs::read_to_string(&path) {
            Ok(saved) if !saved.trim().is_empty() => return Ok((saved.trim().to_owned(), false)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let key = format!("tdk_{}", crate::app::random_secret_text());
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(io_err(&path))?;
        std::io::Write::write_all(&mut file, format!("{key}\n").as_bytes())
            .map_err(io_err(&path))?;
        Ok((key, true))
    }

    impl LocalServer {
        pub async fn start(config: LocalServerConfig) -> Result<Self, StartError> {
            let dir = &config.data_dir;
            let db_path = prepare_data_dir(dir).map_err(io_err(dir))?;
            let lock_path = dir.join("lock");
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io_err(&lock_path))?;
            // The OS drops the lock with the process, even on SIGKILL.
            if lock.try_lock().is_err() {
                return Err(StartError::Locked(dir.clone()));
            }
            let store = SqliteStore::open(&db_path)?;

            let app_config = AppConfig {
                schedule: config.schedule.clone(),
                jitter_ratio: retry::DEFAULT_JITTER_RATIO,
                sweep_grace: config.sweep_grace,
                lease_duration: config.request_timeout + Duration::from_secs(15),
                attempt_budget: config.request_timeout + Duration::from_secs(15),
                sweep_batch: 500,
                // SQLite keeps everything: a paused subscription's deliveries wait as long as it.
                hold_limit: None,
                // No change stream here: the store keeps the fan-out owed.
                fan_out_trigger: FanOutTrigger::Queue,
            };
            let (queue, jobs) = LocalQueue::new();
            let app = Arc::new(App::new(store, queue, SystemClock, app_config));
            // We hold the data dir exclusively: no other worker can own a lease, and whatever was
            // queued in memory before a crash is gone. Make it all due again, before the workers
            // and the sweeper start.
            let recovered = app.recover_after_restart().await?;
            if recovered > 0 {
                tracing::info!(
                    recovered,
                    "unfinished deliveries and fan-outs from the last run are due again"
                );
            }

            let tenant =
                TenantId::parse(DEFAULT_TENANT).map_err(|e| AppError::invalid("tenant", e))?;
            let (api_key, api_key_generated) = default_key(dir, config.api_key.clone())?;
            app.add_api_key(&tenant, &api_key).await?;

            let sender = ReqwestSender::with_resolver(
                SenderConfig {
                    connect_timeout: config.request_timeout.min(Duration::from_secs(5)),
                    total_timeout: config.request_timeout,
                    policy: config.egress.clone(),
                    local_address: config.sender_local_address,
                    ..SenderConfig::default()
                },
                Arc::clone(&config.resolver),
            )?;

            let listener =
                TcpListener::bind(config.listen)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: config.listen,
                        source,
                    })?;
            let addr = listener.local_addr().map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
            let router = crate::api::router(Arc::clone(&app));
            let http = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            });
            let workers = spawn_workers(Arc::clone(&app), Arc::new(sender), jobs, config.workers);
            let sweeper = spawn_sweeper(Arc::clone(&app), config.sweep_interval);
            Ok(Self {
                addr,
                api_key,
                api_key_generated,
                db_path,
                tasks: vec![http, workers, sweeper],
                _lock: lock,
            })
        }

        /// Runs until one of the server's tasks ends (which only happens on a fatal error).
        pub async fn wait(mut self) {
            let tasks = std::mem::take(&mut self.tasks);
            let _ = futures_select_first(tasks).await;
        }
    }

    impl Drop for LocalServer {
        fn drop(&mut self) {
            for task in &self.tasks {
                task.abort();
            }
        }
    }

    async fn futures_select_first(tasks: Vec<JoinHandle<()>>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut handles = Vec::new();
        for task in tasks {
            let tx = tx.clone();
            handles.push(tokio::spawn(async move {
                let _ = task.await;
                let _ = tx.send(()).await;
            }));
        }
        rx.recv().await;
    }
}

#[cfg(test)]
#[cfg(all(unix, feature = "sqlite"))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::prepare_data_dir;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_data_directory_and_its_database_are_for_their_owner_alone() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let db = prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&db), 0o600);
        // An existing database file made by an earlier version is tightened too.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&db), 0o600);
    }
}
