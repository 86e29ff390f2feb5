//! The shared sled layer: one `sled::Db` per data dir and its group commit, for every state
//! family kept in sled (the edition store's trees, Sync storage's and its watches). Each family
//! opens its own trees on the one [`SledDb`] and shares its commits.
//!
//! Durability (fsync policy): [`SledDb::committed`] waits for a commit that *started after* the
//! caller's writes. A commit is `Db::flush` (which writes sled's log buffers to `<dir>/db`)
//! followed by `fsync` (`File::sync_all`) of that file. The fsync is ours because on Linux
//! sled's flush ends with `sync_file_range`, which neither flushes the drive's write cache nor
//! the file's metadata: enough to survive a killed process, not a power cut. One commit thread
//! runs commits back to back; every caller that arrives while one runs shares the next, so N
//! concurrent PUTs cost about two fsyncs, not N. The thread is a plain OS thread, not a task
//! plus `spawn_blocking` per commit: a commit then costs one wake-up of the thread and one
//! broadcast to its waiters, and no hop through the runtime's blocking pool. sled's own
//! periodic flush (every 500 ms, also with fsync) is left on as a second line only.
//!
//! A commit that fails (or panics) is final: tickets it or any later commit covers report the
//! failure, `/health` turns 503, and [`SledDb::failed`] completes, on which the server shuts down
//! and exits for its supervisor to restart it (see `Committed`, and `server::run`). While no
//! ticket waits, the thread checks sled every [`PROBE_EVERY`] with a flush (no fsync), so a
//! write error that sled's own background flush met first is not left unnoticed while every
//! later write fails before it takes a ticket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{CommitTicket, Result, StoreError};

/// How often the idle commit thread asks sled whether its log still writes (see the module doc).
/// Not a limit: it bounds how long a failed disk goes unnoticed when no request commits.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long dropping the last handle waits for the commit thread to let go of the database (it
/// may be in a commit or probe), so that a reopen in this process finds sled's lock released.
/// Bounded, so a hung disk cannot hold the process's exit.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What a caller hears once a commit has failed.
const FAILED: &str = "a commit failed; the server stops, to recover from its log on restart";

/// One sled database and its group commit. Clones share both.
#[derive(Clone)]
pub struct SledDb {
    inner: Arc<DbInner>,
    /// Dropped after `inner` (fields drop in order): see [`Closer`].
    _closer: Arc<Closer>,
}

/// Ends with the last handle: waits (at most [`CLOSE_WAIT`]) until the commit thread has ended
/// and so dropped its reference, which closes the database.
struct Closer(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl Drop for Closer {
    fn drop(&mut self) {
        // Disconnected when the thread ends (nothing is ever sent).
        if let Ok(rx) = self.0.get_mut() {
            let _ = rx.recv_timeout(CLOSE_WAIT);
        }
    }
}

struct DbInner {
    db: sled::Db,
    /// sled's log file (`<dir>/db`), opened once so every commit can fsync it.
    log: std::fs::File,
    commit: GroupCommit,
    /// How long [`SledDb::committed`] waits before it reports [`StoreError::Timeout`].
    write_timeout: Duration,
}

/// Tickets and the flush that covers them. See the module documentation.
struct GroupCommit {
    /// Highest ticket handed out; a ticket is taken after the caller's writes.
    requested: AtomicU64,
    /// Which tickets finished commits cover; see [`Committed`].
    done: watch::Sender<Committed>,
    /// The flusher thread, unparked for each ticket (a no-op while it is busy committing).
    flusher: std::sync::OnceLock<std::thread::Thread>,
}

/// What the commits so far have made durable.
#[derive(Clone, Copy, Default)]
struct Committed {
    /// Highest ticket covered by a finished commit.
    covered: u64,
    /// Set by the first commit that failed: tickets above this one are not known to be durable,
    /// now or later. After a failed fsync the kernel may have dropped the dirty pages, so a
    /// later fsync that succeeds proves nothing about them: like PostgreSQL, the store stops
    /// promising durability until it is restarted (and `/health` says so).
    failed_above: Option<u64>,
}

impl Committed {
    /// `Some(durable?)` once `ticket` is decided.
    fn outcome(&self, ticket: u64) -> Option<bool> {
        match self.failed_above {
            Some(above) if ticket > above => Some(false),
            _ if ticket <= self.covered => Some(true),
            _ => None,
        }
    }
}

impl Drop for DbInner {
    fn drop(&mut self) {
        // The flusher holds only a weak reference: wake it to see the store is gone and exit.
        if let Some(thread) = self.commit.flusher.get() {
            thread.unpark();
        }
    }
}

impl SledDb {
    /// Opens (or creates) the database in `dir` and starts its commit thread. Blocking (sled
    /// recovers its log): call it off the async workers.
    pub fn open(dir: &std::path::Path, cache_bytes: u64, write_timeout: Duration) -> Result<SledDb> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                // sled words a held lock as an I/O error quoting `WouldBlock`.
                sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock") => {
                    StoreError::Io(format!(
                        "another editiond is using {} (its lock is held)",
                        dir.display()
                    ))
                }
                e => e.into(),
            })?;
        let io = |what: &str, e: std::io::Error| StoreError::Io(format!("{what} {}: {e}", dir.display()));
        let log = std::fs::File::open(dir.join("db")).map_err(|e| io("open log file in", e))?;
        // The log file's directory entry must be durable too (it is new on first start).
        #[cfg(unix)]
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("fsync directory", e))?;
        let inner = Arc::new(DbInner {
            db,
            log,
            commit: GroupCommit {
                requested: AtomicU64::new(0),
                done: watch::Sender::new(Committed::default()),
                flusher: std::sync::OnceLock::new(),
            },
            write_timeout,
        });
        let weak = Arc::downgrade(&inner);
        let (ended, closer) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || flusher(weak, ended))
            .map_err(|e| StoreError::Io(format!("start the commit thread: {e}")))?;
        let _ = inner.commit.flusher.set(thread.thread().clone());
        Ok(SledDb {
            inner,
            _closer: Arc::new(Closer(std::sync::Mutex::new(closer))),
        })
    }

    /// Opens (or creates) one tree; a state family names its own.
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.inner.db.open_tree(name)?)
    }

    /// Commits synchronously (blocking); used at shutdown. A failure counts as a failed commit.
    pub fn flush_now(&self) -> Result<()> {
        self.inner.commit().inspect_err(|_| {
            self.inner.commit.done.send_modify(|done| {
                done.failed_above.get_or_insert(done.covered);
            });
        })
    }

    /// Completes once a commit has failed (at once if one has): the process must not go on as
    /// if writes were durable. Never completes if the database closes first.
    pub fn failed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut done = self.inner.commit.done.subscribe();
        async move {
            if done.wait_for(|d| d.failed_above.is_some()).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether a commit has failed.
    pub fn has_failed(&self) -> bool {
        self.inner.commit.done.borrow().failed_above.is_some()
    }

    pub fn request_commit(&self) -> CommitTicket {
        let commit = &self.inner.commit;
        let ticket = commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(thread) = commit.flusher.get() {
            thread.unpark();
        }
        CommitTicket(ticket)
    }

    pub async fn committed(&self, CommitTicket(ticket): CommitTicket) -> Result<()> {
        let mut done = self.inner.commit.done.subscribe();
        let decided = async {
            let d = done.wait_for(|d| d.outcome(ticket).is_some()).await;
            d.map(|d| d.outcome(ticket))
        };
        match tokio::time::timeout(self.inner.write_timeout, decided).await {
            Ok(Ok(Some(true))) => Ok(()),
            Ok(Ok(_)) => Err(StoreError::Io(FAILED.into())),
            Ok(Err(_)) => Err(StoreError::Io("store closed".into())),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// `Err` once a commit has failed: durability is no longer promised until restart.
    pub fn health(&self) -> Result<()> {
        // Embedded: nothing to reach, but a failed commit is for good (see `Committed`).
        if self.has_failed() {
            return Err(StoreError::Io(FAILED.into()));
        }
        Ok(())
    }
}

impl DbInner {
    /// One commit (blocking): sled's flush, then fsync of its log file. See the module doc.
    fn commit(&self) -> Result<()> {
        self.db.flush()?;
        self.log
            .sync_all()
            .map_err(|e| StoreError::Io(format!("fsync: {e}")))
    }

    /// Whether sled's log still writes: its flush fails once sled has met a write error (sled
    /// keeps the first one, and the log past the last good write is never stable again).
    fn probe(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// Runs commits while tickets are waiting, and a probe every [`PROBE_EVERY`] while none are;
/// ends when the store is dropped, and then drops `_ended` (see [`Closer`]).
fn flusher(inner: std::sync::Weak<DbInner>, _ended: std::sync::mpsc::Sender<()>) {
    let mut last = std::time::Instant::now();
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let commit = &inner.commit;
        let target = commit.requested.load(Ordering::SeqCst);
        let before = *commit.done.borrow();
        let (what, run): (&str, fn(&DbInner) -> Result<()>) = if target > before.covered {
            ("commit", DbInner::commit)
        } else if before.failed_above.is_none() && last.elapsed() >= PROBE_EVERY {
            ("probe", DbInner::probe)
        } else {
            drop(inner);
            // A ticket taken after the load above unparked this thread, so park returns at once.
            std::thread::park_timeout(PROBE_EVERY);
            continue;
        };
        last = std::time::Instant::now();
        // A panic in sled must not end the thread (every ticket would then time out unanswered).
        let ok = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&inner))) {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "store {what} failed; durability is no longer promised: stopping");
                false
            }
            Err(_) => {
                tracing::error!("store {what} panicked; durability is no longer promised: stopping");
                false
            }
        };
        commit.done.send_modify(|done| {
            if !ok {
                done.failed_above.get_or_insert(before.covered);
            }
            done.covered = done.covered.max(target);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_commit_fails_its_tickets_and_every_later_one_but_not_earlier_ones() {
        let mut done = Committed::default();
        assert_eq!(done.outcome(1), None);
        done.covered = 5;
        assert_eq!(done.outcome(5), Some(true));
        assert_eq!(done.outcome(6), None);
        // The commit covering 6..=8 fails, a later one covering 9..=12 succeeds.
        done.failed_above = Some(5);
        done.covered = 12;
        assert_eq!(done.outcome(3), Some(true), "committed before the failure");
        assert_eq!(done.outcome(7), Some(false));
        assert_eq!(done.outcome(11), Some(false), "not proven by a later fsync");
        assert_eq!(done.outcome(20), Some(false), "decided at once, no wait");
    }
}
