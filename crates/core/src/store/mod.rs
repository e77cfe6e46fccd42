//! The one store API every binary uses, over SQLite (embedded default) or PostgreSQL.
//!
//! Queries are written once in SQL both databases accept (`$1` placeholders, `RETURNING`,
//! `ON CONFLICT`); the few places that differ (the queue's `FOR UPDATE SKIP LOCKED`) branch on
//! [`Backend`]. Migrations for each live in `migrations/sqlite` and `migrations/postgres`.

mod batches;
mod curation;
mod files;
mod imports;
mod learned;
mod overview;
mod predictions;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};

pub use batches::{
    BatchLine, BatchRecord, BatchStatus, FileDeletion, LineKind, NewBatch, NulInText,
};
pub use curation::{
    AccuracyRecord, AnnotationCounts, AnnotationRow, Conflict, ConflictKind, ConflictSummary,
    CurationTx, Delivered, ExportRecord, FailedWebhookEvent, NewWebhookEvent, ObjectWrite,
    PredictionRow, ProjectRow, TaskRow, WebhookEvent, WebhookEventCounts, FAILED_OUTCOME,
};
pub use files::FileRecord;
pub use imports::ImportedLine;
pub use learned::{AnnotationState, LearnedModel, TrainingAnnotation};
pub use overview::{
    accuracy_point, AccuracyPoint, BatchCounts, MilestoneReached, ProjectOverview, WorkerHeartbeat,
    WorkerRecord,
};
pub use predictions::CachedPrediction;

/// Which database a [`Store`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file (WAL mode); one machine.
    Sqlite,
    /// A PostgreSQL server; several workers on several machines.
    Postgres,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: use sqlite://path or postgres://user@host/db")]
    UnsupportedUrl(String),
    /// The database refused or failed a query.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed to apply.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back (a corrupt row).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// Creating the SQLite file's directory failed.
    #[error("cannot create database directory: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether the database is out of reach or refusing work for now (connection lost or
    /// refused, no connection within the acquire timeout, the server shutting down or full, an
    /// SQLite file locked past its busy timeout): worth a 503 and a retry, not a bug.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Database(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // PostgreSQL: connection exceptions (class 08), shutting down or not yet
                // accepting (57P01-57P03), too many connections (53300).
                code.starts_with("08")
                    || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
                    // SQLite (primary result codes): BUSY, LOCKED, CANTOPEN.
                    || code
                        .parse::<i64>()
                        .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 14))
            }),
            _ => false,
        }
    }
}

/// Handle to the shared database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

impl Store {
    /// Connects, creating an SQLite file (and its directory) if needed, and applies migrations;
    /// a connection is waited for at most the default `database.acquire_timeout_ms`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let wait = Duration::from_millis(crate::config::DEFAULT_ACQUIRE_TIMEOUT_MS);
        Store::connect_with(url, max_connections, wait).await
    }

    /// [`Store::connect`] waiting at most `acquire_timeout` for a connection: past it a query
    /// fails as unavailable ([`StoreError::is_unavailable`]) instead of hanging.
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(crate::secret::redact_url(url)));
        };
        let mut url = url.to_string();
        if backend == Backend::Sqlite {
            if let Some(path) = sqlite_path(&url) {
                if let Some(dir) = std::path::Path::new(&path).parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir)?;
                    }
                }
            }
            if !url.contains("mode=") && !url.contains(":memory:") {
                url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers (the API) run while a writer (a worker) commits;
                        // busy_timeout makes concurrent writers wait instead of failing.
                        // busy_timeout first: switching a new file to WAL needs a lock that
                        // another process starting at the same moment may hold.
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    /// Connects to the configured database (see [`Store::connect`]).
    pub async fn open(config: &crate::config::DatabaseConfig) -> Result<Store, StoreError> {
        let wait = Duration::from_millis(config.acquire_timeout_ms);
        Store::connect_with(&config.url, config.max_connections, wait).await
    }

    /// Applies pending migrations. PostgreSQL serialises concurrent migrators with an advisory
    /// lock; SQLite has none, so when several binaries start on a new file at once, the loser of
    /// the race retries until the winner's migrations are visible.
    async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        let mut attempt = 0;
        loop {
            match migrator.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(e) if self.backend == Backend::Sqlite && attempt < 20 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "migration raced another process; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Which database this store talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers (for readiness probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every pooled connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.to_string())
}

/// Current time in unix seconds, the unit of every stored timestamp.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::sqlite_path;

    #[test]
    fn sqlite_paths_are_read_from_urls() {
        assert_eq!(
            sqlite_path("sqlite://data/batchlab.db").as_deref(),
            Some("data/batchlab.db")
        );
        assert_eq!(
            sqlite_path("sqlite:///tmp/x.db?mode=rwc").as_deref(),
            Some("/tmp/x.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }
}
