//! Fresh, isolated databases for tests, on SQLite and on PostgreSQL.
//!
//! PostgreSQL tests create a database of their own (`batchlab_test_<uuid>`) on the server named
//! by `BATCHLAB_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`). When
//! the server cannot be reached the tests fail if `BATCHLAB_REQUIRE_POSTGRES=1` (as the test
//! script sets it) and are skipped with a message otherwise.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::{Connection, Executor};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::store::Store;

/// The admin URL PostgreSQL test databases are created through.
pub fn postgres_admin_url() -> String {
    std::env::var("BATCHLAB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database that exists for one test, empty: no migration applied yet. For upgrade tests
/// ([`EmptyDb::migrate_to`]); [`TestDb`] is one of these, migrated.
pub struct EmptyDb {
    /// Its URL.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl EmptyDb {
    /// A new SQLite file (not created yet) in a temporary directory.
    pub fn sqlite() -> EmptyDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        EmptyDb {
            url,
            _dir: Some(dir),
            pg_name: None,
        }
    }

    /// A new PostgreSQL database, or `None` (after saying why) when no server answers and
    /// PostgreSQL is not required.
    pub async fn postgres() -> Option<EmptyDb> {
        sqlx::any::install_default_drivers();
        let admin = postgres_admin_url();
        let mut conn = match sqlx::AnyConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) if std::env::var("BATCHLAB_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!(
                    "PostgreSQL is required (BATCHLAB_REQUIRE_POSTGRES=1) but {admin} failed: {e}"
                )
            }
            Err(e) => {
                eprintln!("skipping PostgreSQL test: {admin} unreachable ({e}); set BATCHLAB_REQUIRE_POSTGRES=1 to fail instead");
                return None;
            }
        };
        let name = format!("batchlab_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        let _ = conn.close().await;
        Some(EmptyDb {
            url: with_database(&admin, &name),
            _dir: None,
            pg_name: Some(name),
        })
    }

    /// Applies batchlab's migrations numbered up to `version` only (the files of
    /// `migrations/sqlite` or `migrations/postgres`), as an older release left the database;
    /// [`Store::connect`] then applies the rest, as an upgrade does.
    pub async fn migrate_to(&self, version: i64) {
        let kind = if self.pg_name.is_some() {
            "postgres"
        } else {
            "sqlite"
        };
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../migrations/{kind}"));
        let older = tempfile::tempdir().expect("temp dir");
        for entry in std::fs::read_dir(&source).expect("migrations directory") {
            let path = entry.expect("migration file").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let number: i64 = name.split('_').next().unwrap().parse().unwrap();
            if number <= version {
                std::fs::copy(&path, older.path().join(&name)).expect("copy migration");
            }
        }
        sqlx::any::install_default_drivers();
        let url = if kind == "sqlite" {
            format!("{}?mode=rwc", self.url)
        } else {
            self.url.clone()
        };
        let pool = sqlx::AnyPool::connect(&url).await.expect("connect");
        sqlx::migrate::Migrator::new(older.path())
            .await
            .expect("read migrations")
            .run(&pool)
            .await
            .expect("apply older migrations");
        pool.close().await;
    }

    /// Drops a PostgreSQL database (SQLite files go with the temp dir).
    pub async fn cleanup(self) {
        if let Some(name) = &self.pg_name {
            if let Ok(mut conn) = sqlx::AnyConnection::connect(&postgres_admin_url()).await {
                let _ = conn
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
            }
        }
    }
}

/// A database that exists for one test, migrated, with a store over it.
pub struct TestDb {
    /// The store over it, migrated.
    pub store: Store,
    /// Its URL, for handing to child processes.
    pub url: String,
    db: EmptyDb,
}

impl TestDb {
    /// A new SQLite file in a temporary directory.
    pub async fn sqlite() -> TestDb {
        TestDb::over(EmptyDb::sqlite(), 4).await
    }

    /// A new PostgreSQL database, or `None` (after saying why) when no server answers and
    /// PostgreSQL is not required.
    pub async fn postgres() -> Option<TestDb> {
        Some(TestDb::over(EmptyDb::postgres().await?, 8).await)
    }

    async fn over(db: EmptyDb, connections: u32) -> TestDb {
        let store = Store::connect(&db.url, connections)
            .await
            .expect("open the test database");
        TestDb {
            store,
            url: db.url.clone(),
            db,
        }
    }

    /// Closes the pool and drops a PostgreSQL database (SQLite files go with the temp dir).
    pub async fn cleanup(self) {
        self.store.close().await;
        self.db.cleanup().await;
    }
}

/// `admin` with its database name replaced by `name` (query parameters kept).
fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = admin
        .split_once('?')
        .map(|(b, q)| (b, format!("?{q}")))
        .unwrap_or((admin, String::new()));
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{server}/{name}{query}")
}

/// A TCP proxy to one upstream address that a test can cut (every open connection dropped, new
/// ones refused) and restore: a database outage at the network level.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (d, l) = (down.clone(), links.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: the database is "down"
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().unwrap().push(link.abort_handle());
            }
        });
        TcpProxy { addr, down, links }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// `url` with its `host:port` replaced by `addr`, and the `host:port` it had.
pub fn through(url: &str, addr: SocketAddr) -> (String, String) {
    let start = url
        .find('@')
        .map(|i| i + 1)
        .unwrap_or(url.find("://").unwrap() + 3);
    let end = start + url[start..].find('/').unwrap();
    let upstream = url[start..end].to_string();
    (format!("{}{addr}{}", &url[..start], &url[end..]), upstream)
}

/// Defines each named test twice, in modules `sqlite` and `postgres`: `async fn name(Store)`
/// run on a fresh SQLite database and on a fresh PostgreSQL one (skipped with a message when the
/// server is away, failed instead under `BATCHLAB_REQUIRE_POSTGRES=1`). With `with fixture;`
/// first, each test gets `fixture(&TestDb)` (a function of the calling file) instead.
#[macro_export]
macro_rules! on_both_backends {
    (with $fixture:ident; $($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = $crate::testing::TestDb::sqlite().await;
                    super::$name(super::$fixture(&db)).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = $crate::testing::TestDb::postgres().await else { return };
                    super::$name(super::$fixture(&db)).await;
                    db.cleanup().await;
                }
            )*
        }
    };
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = $crate::testing::TestDb::sqlite().await;
                    super::$name(db.store.clone()).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = $crate::testing::TestDb::postgres().await else { return };
                    super::$name(db.store.clone()).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

/// A PostgreSQL test database reached through a [`TcpProxy`] the test can cut: the proxy, a
/// configuration whose `database` points through it (two connections, a one-second acquire
/// timeout so an outage answers quickly) and a store opened with it.
pub async fn behind_proxy(db: &TestDb) -> (TcpProxy, crate::config::Config, Store) {
    let (_, upstream) = through(&db.url, "127.0.0.1:1".parse().unwrap());
    let proxy = TcpProxy::start(upstream).await;
    let (url, _) = through(&db.url, proxy.addr);
    let mut config = crate::config::Config::default();
    config.database.url = url;
    config.database.max_connections = 2;
    config.database.acquire_timeout_ms = 1_000;
    let store = Store::open(&config.database)
        .await
        .expect("the store through the proxy");
    (proxy, config, store)
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(
            super::with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u@h", "x"),
            "postgres://u@h/x"
        );
        assert_eq!(
            super::with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
