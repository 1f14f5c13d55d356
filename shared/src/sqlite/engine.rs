//! The SQLite engine under the store: connections, threads and group commit. It runs closures
//! on connections and knows nothing of Tidings' tables (`super` does).
//!
//! Threads: one writer thread owns the read-write connection; writes reach it over a channel and
//! get their answer back on a oneshot, so a write costs one hand-off each way. JSON is encoded
//! before and decoded after the hand-off, on the caller's task, to keep the writer's work short.
//! Reads run on the caller's thread, on a read-only connection taken from a small pool (WAL lets
//! them read while the writer commits): a read of a cached page takes microseconds, less than the
//! two thread hand-offs it used to cost (the profile of the burst benchmark showed the reader
//! thread's wake-ups among the largest costs). A second thread copies the WAL into the database
//! file (a checkpoint, with its own fsync of that file) while the writer goes on committing,
//! instead of the writer doing it inside every thousandth commit with everyone in that batch
//! waiting.
//!
//! Group commit: the writer takes every write already queued (up to [`MAX_BATCH`]), runs each in
//! its own SAVEPOINT inside one transaction, and commits once: one WAL sync for the whole batch,
//! with `synchronous = FULL` as before. A write that fails its own check (`Conflict`, `NotFound`)
//! or errors rolls back to its savepoint only. Nobody hears `Ok` before the commit returned, and if
//! the commit fails every write of the batch fails with it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, ffi};
use tokio::sync::oneshot;

use crate::ports::{StoreError, StoreResult};

/// The most writes one group commit takes: bounds how long the first of them waits.
pub(super) const MAX_BATCH: usize = 256;

/// How long the checkpointer lets the WAL grow after a commit before copying it into the
/// database: one checkpoint (and one fsync of the database file) then covers many commits.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// WAL length (in pages) at which the writer checkpoints by itself (SQLite's default is 1,000).
/// The checkpointer normally copies the pages long before; the writer's own checkpoint then only
/// finishes the last few and lets the next commit start the WAL from the top, so it stays
/// around this size (16 MiB of 4 KiB pages) however long the load lasts.
pub(super) const WRITER_AUTOCHECKPOINT_PAGES: u32 = 4_000;

/// The engine behind a [`SqliteStore`](super::SqliteStore). Clones share the connections and
/// their threads, which stop (after finishing the calls already queued) when the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub(super) struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<WriterMsg>>,
    /// `None` for an in-memory database (no second connection can see it): reads go to the writer.
    readers: Option<ReaderPool>,
    writer_thread: Option<JoinHandle<()>>,
    checkpointer_thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Drop for Inner {
    /// Closes the channels and waits for the threads (the writer finishes what is queued), so the
    /// file is closed when the store is gone, as it was when the connection lived here. The
    /// checkpointer's read-write connection closes last: SQLite then checkpoints and removes the
    /// WAL.
    fn drop(&mut self) {
        // A thread that panicked has nothing left to clean up, hence the ignored joins.
        self.readers = None;
        // The writer drops the checkpointer's wake-up channel as it ends.
        self.writer = None;
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.checkpointer_thread.take() {
            self.stats.closing.store(true, Ordering::Release);
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// What the threads share besides their channels; tests read the counters to see that commits
/// are shared.
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// Writes handed to the writer thread.
    pub(super) submitted: AtomicU64,
    /// Transactions the writer committed (each one WAL sync).
    pub(super) commits: AtomicU64,
    /// Background checkpoints run.
    pub(super) checkpoints: AtomicU64,
    /// Set when the store is dropped: the checkpointer stops waiting.
    closing: AtomicBool,
}

/// A read, boxed with the oneshot it answers on.
pub(super) type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

enum WriterMsg {
    /// In-memory stores only.
    Read(ReadJob),
    Write(Box<dyn WriteJob>),
}

impl std::fmt::Debug for WriterMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Read(_) => "Read",
            Self::Write(_) => "Write",
        })
    }
}

/// One write of a group commit: `run` inside the batch's transaction, `reply` once its fate is
/// known.
trait WriteJob: Send {
    /// Does the write on `conn` (inside its savepoint) and keeps the answer; `false` if it failed,
    /// so its savepoint must be rolled back.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the kept answer if the batch committed, else the batch's failure.
    fn reply(self: Box<Self>, batch: Result<(), &GroupCommitFailed>);
}

struct PendingWrite<T, F> {
    work: Option<F>,
    answer: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> WriteJob for PendingWrite<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let answer = catch_unwind(AssertUnwindSafe(|| work(conn)))
            .unwrap_or_else(|_| Err(StoreError::unavailable(Panicked)));
        let ok = answer.is_ok();
        self.answer = Some(answer);
        ok
    }

    fn reply(self: Box<Self>, batch: Result<(), &GroupCommitFailed>) {
        let answer = match (batch, self.answer) {
            (Ok(()), Some(answer)) => answer,
            // Even a `Conflict` may have been judged on a write the failed commit took back.
            (Err(failed), _) => Err(StoreError::unavailable(failed.clone())),
            // Every write of a committed batch ran; this is only for completeness.
            (Ok(()), None) => Err(StoreError::unavailable(Stopped)),
        };
        // The caller may have gone away; the write stands regardless, as any committed write.
        let _ = self.reply.send(answer);
    }
}

/// The batch a write was part of did not commit, so the write did not happen.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the group commit failed; no write of its batch was saved")]
struct GroupCommitFailed(#[source] Arc<rusqlite::Error>);

/// The store's thread answered no more (it stopped, or the call panicked on it).
#[derive(Debug, thiserror::Error)]
#[error("the SQLite thread stopped before answering")]
struct Stopped;

#[derive(Debug, thiserror::Error)]
#[error("the store call panicked")]
struct Panicked;

impl Engine {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    ///
    /// Another process (the `tidings keys create` CLI) may open the same file while a server
    /// runs: WAL lets readers and one writer share it, and the busy timeout makes writers queue.
    /// Blocking (up to that timeout): call it at start-up, not on a busy runtime thread.
    pub(super) fn open(path: &Path, prepare: Prepare) -> Result<Self, StoreError> {
        let writer = Connection::open(path).map_err(StoreError::unavailable)?;
        // Before anything else: switching to WAL itself may wait for another process's lock.
        set_busy_timeout(&writer)?;
        let mode: String = writer
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(StoreError::unavailable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::unavailable(format!(
                "{}: SQLite refused WAL mode (got `{mode}`)",
                path.display()
            )));
        }
        let writer = init(writer, prepare)?;
        writer
            .pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .map_err(StoreError::unavailable)?;
        // Both opened after the writer made the file WAL and current. Readers can never write.
        let readers = ReaderPool {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        };
        let first = readers.open()?;
        readers.give_back(first);
        // A checkpoint needs a read-write connection; this one runs nothing else.
        let checkpointer = Connection::open(path).map_err(StoreError::unavailable)?;
        set_busy_timeout(&checkpointer)?;
        // The checkpoint syncs the WAL before and the database after copying, unless sync is OFF.
        checkpointer
            .pragma_update(None, "synchronous", "FULL")
            .map_err(StoreError::unavailable)?;
        Self::start(
            writer,
            Some(FileConnections {
                readers,
                checkpointer,
            }),
        )
    }

    /// A private, empty in-memory database (tests).
    pub(super) fn open_in_memory(prepare: Prepare) -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(StoreError::unavailable)?;
        set_busy_timeout(&conn)?;
        Self::start(init(conn, prepare)?, None)
    }

    fn start(writer: Connection, file: Option<FileConnections>) -> Result<Self, StoreError> {
        let stats = Arc::new(Stats::default());
        let (writer_tx, writer_rx) = mpsc::channel();
        let mut inner = Inner {
            writer: Some(writer_tx),
            readers: None,
            writer_thread: None,
            checkpointer_thread: None,
            stats: Arc::clone(&stats),
        };
        // From here on, dropping `inner` on an error stops whatever was started.
        let wake_checkpointer = match file {
            Some(FileConnections {
                readers,
                checkpointer,
            }) => {
                inner.readers = Some(readers);
                // One slot: a wake-up already waiting covers every later commit.
                let (wake, woken) = mpsc::sync_channel(1);
                let stats = Arc::clone(&stats);
                inner.checkpointer_thread = Some(spawn("sqlite-checkpoint", move || {
                    checkpointer_loop(&checkpointer, &woken, &stats);
                })?);
                Some(wake)
            }
            None => None,
        };
        inner.writer_thread = Some(spawn("sqlite-writer", move || {
            writer_loop(&writer, &writer_rx, &stats, wake_checkpointer.as_ref());
        })?);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Runs the read `f` here, on a pooled read-only connection (on the writer's thread for an
    /// in-memory store).
    pub(super) async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        if let Some(readers) = &self.inner.readers {
            let conn = readers.take()?;
            let result = catch_unwind(AssertUnwindSafe(|| f(&conn)));
            readers.give_back(conn);
            return result.unwrap_or_else(|_| Err(StoreError::unavailable(Panicked)));
        }
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        let sent = match &self.inner.writer {
            Some(writer) => writer.send(WriterMsg::Read(job)).is_ok(),
            None => false,
        };
        if !sent {
            return Err(StoreError::unavailable(Stopped));
        }
        rx.await.map_err(|_| StoreError::unavailable(Stopped))?
    }

    /// Runs the write `f` in the writer's next group commit; answers once that batch committed.
    pub(super) async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Box::new(PendingWrite {
            work: Some(f),
            answer: None,
            reply: tx,
        });
        let writer = self
            .inner
            .writer
            .as_ref()
            .ok_or_else(|| StoreError::unavailable(Stopped))?;
        self.inner.stats.submitted.fetch_add(1, Ordering::Relaxed);
        writer
            .send(WriterMsg::Write(job))
            .map_err(|_| StoreError::unavailable(Stopped))?;
        rx.await.map_err(|_| StoreError::unavailable(Stopped))?
    }

    /// Test hooks: a job on the writer's thread between batches, and the counters.
    #[cfg(test)]
    pub(super) fn send_to_writer(&self, job: ReadJob) {
        if let Some(writer) = &self.inner.writer {
            let _ = writer.send(WriterMsg::Read(job));
        }
    }

    #[cfg(test)]
    pub(super) fn stats(&self) -> &Stats {
        &self.inner.stats
    }
}

/// The connections a file-backed store has besides the writer's.
struct FileConnections {
    readers: ReaderPool,
    checkpointer: Connection,
}

/// Idle read-only connections; a read takes one (opening another when all are busy) and gives it
/// back, keeping at most [`MAX_IDLE_READERS`].
#[derive(Debug)]
struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

/// About the number of threads that read at once (the runtime's workers).
const MAX_IDLE_READERS: usize = 16;

impl ReaderPool {
    fn open(&self) -> StoreResult<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(StoreError::unavailable)?;
        set_busy_timeout(&conn)?;
        keep_statements(&conn);
        Ok(conn)
    }

    fn take(&self) -> StoreResult<Connection> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => self.open(),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(StoreError::unavailable)
}

fn set_busy_timeout(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(StoreError::unavailable)
}

/// Brings a read-write connection's schema up to date (the store's migrations).
pub(super) type Prepare = fn(&mut Connection) -> Result<(), StoreError>;

/// Per-connection settings and the schema, on the read-write connection.
fn init(mut conn: Connection, prepare: Prepare) -> Result<Connection, StoreError> {
    // An accepted event must survive a power cut: FULL syncs the WAL on every commit.
    // (Per connection, not stored in the file, so it is set on every open.)
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(StoreError::unavailable)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(StoreError::unavailable)?;
    prepare(&mut conn)?;
    keep_statements(&conn);
    Ok(conn)
}

/// Every statement a connection runs stays prepared (rusqlite keeps 16 by default; the writer
/// alone has 16, and an in-memory store's writer runs the reads too).
fn keep_statements(conn: &Connection) {
    conn.set_prepared_statement_cache_capacity(64);
}

fn run_read(conn: &Connection, job: ReadJob) {
    // A panicking read drops its oneshot (its caller hears `Stopped`); the thread carries on.
    let _ = catch_unwind(AssertUnwindSafe(|| job(conn)));
}

/// The writer thread: takes what is queued, answers reads at once (in-memory stores), and commits
/// the writes together.
fn writer_loop(
    conn: &Connection,
    rx: &mpsc::Receiver<WriterMsg>,
    stats: &Stats,
    wake_checkpointer: Option<&mpsc::SyncSender<()>>,
) {
    let mut batch: Vec<Box<dyn WriteJob>> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                // Outside any transaction: a read sees committed writes only. Answering it
                // before writes queued ahead of it is fine, as none of those has been answered.
                WriterMsg::Read(job) => run_read(conn, job),
                WriterMsg::Write(job) => batch.push(job),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let outcome = group_commit(conn, &mut batch);
            if outcome.is_ok() {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                if let Some(wake) = wake_checkpointer {
                    // Full: a wake-up is already waiting. Disconnected: it has stopped.
                    let _ = wake.try_send(());
                }
            } else if !conn.is_autocommit() {
                // The error is already on its way to every caller; leave the connection clean.
                let _ = conn.execute_batch("ROLLBACK");
            }
            let outcome = outcome.map_err(|e| GroupCommitFailed(Arc::new(e)));
            for job in batch.drain(..) {
                job.reply(outcome.as_ref().map(|_| ()));
            }
        }
    }
}

/// The checkpointer thread: after each commit (at most one per [`CHECKPOINT_INTERVAL`]), copies
/// what the WAL holds into the database without blocking the writer or readers (PASSIVE).
fn checkpointer_loop(conn: &Connection, woken: &mpsc::Receiver<()>, stats: &Stats) {
    let mut failing = false;
    while woken.recv().is_ok() {
        if stats.closing.load(Ordering::Acquire) {
            return;
        }
        // Unparked at once when the store is dropped.
        std::thread::park_timeout(CHECKPOINT_INTERVAL);
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => {
                stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                failing = false;
            }
            // Nothing is lost: the writer checkpoints by itself once the WAL is long enough.
            Err(e) if !failing => {
                tracing::warn!(error = %e, "background checkpoint failed");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Runs every write of `batch` in its own savepoint inside one IMMEDIATE transaction and commits
/// it. `Err` if the transaction as a whole failed (nothing of it was saved).
fn group_commit(conn: &Connection, batch: &mut [Box<dyn WriteJob>]) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock up front, so each write's checks and changes are one atomic
    // step even with a second process on the file.
    exec(conn, "BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        exec(conn, "SAVEPOINT write")?;
        if !job.run(conn) {
            // Only this write's changes go; the batch goes on.
            exec(conn, "ROLLBACK TO write")?;
        }
        exec(conn, "RELEASE write")?;
        // Some errors (I/O, disk full) make SQLite roll the whole transaction back; the writes
        // before this one are gone then, so the batch has failed.
        if conn.is_autocommit() {
            return Err(rusqlite::Error::SqliteFailure(
                ffi::Error::new(ffi::SQLITE_ABORT),
                Some("SQLite rolled back the group commit's transaction".into()),
            ));
        }
    }
    exec(conn, "COMMIT")
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}
