//! File bodies (batch inputs, outputs, error files) behind one storage interface, streamed both
//! ways so a 200 MB upload never sits in memory.
//!
//! Two backends sit behind [`BlobStore`]:
//! - a local directory (`storage.files_dir`, the embedded default): a body is written to a
//!   temporary name, synced and renamed into place when complete, so a reader never sees half a
//!   file and a failed upload leaves nothing behind;
//! - any [`object_store`] store, in practice S3 or an S3-compatible service
//!   (`storage.files_url = "s3://bucket/prefix"`), so workers on several machines share the
//!   bodies through it and PostgreSQL alone. A body is sent as one `PUT` when it fits in one part
//!   and as a multipart upload of [`PART_BYTES`] parts (at most [`PARTS_IN_FLIGHT`] at once)
//!   otherwise; the object appears only when the upload completes, and a failed or dropped
//!   writer aborts it.
//!
//! The local directory keeps its own implementation rather than `object_store`'s
//! `LocalFileSystem`, because that one neither syncs a body before renaming it into place nor
//! removes a dropped upload's temporary file before the drop returns; both are promises this
//! module already made (the fault suite's full disk relies on the second).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::{AsyncRead, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::task::JoinSet;

use crate::config::StorageConfig;

/// Bytes in one part of a multipart upload (S3 wants at least 5 MiB for every part but the
/// last); a body no longer than this is sent as a single `PUT`.
pub const PART_BYTES: usize = 8 * 1024 * 1024;

/// Parts of one upload sent at once; with the part being filled, an upload holds at most
/// `(PARTS_IN_FLIGHT + 1) * PART_BYTES` bytes in memory, whatever the body's size.
pub const PARTS_IN_FLIGHT: usize = 2;

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The id contains characters that could escape the directory.
    #[error("invalid blob id {0:?}")]
    InvalidId(String),
    /// No body stored under this id.
    #[error("no stored body for {0}")]
    NotFound(String),
    /// The body exceeded the byte limit.
    #[error("file is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// The body exceeded the line limit.
    #[error("file has more than {0} lines")]
    TooManyLines(u64),
    /// The body is not valid UTF-8 text.
    #[error("file is not valid UTF-8 (first invalid byte at offset {0})")]
    NotUtf8(u64),
    /// The upload stream broke off.
    #[error("upload interrupted: {0}")]
    Source(String),
    /// The disk failed.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The object storage refused or failed a request (or could not be set up from the AWS
    /// variables).
    #[error("object storage error: {0}")]
    Store(#[source] object_store::Error),
    /// `storage.files_url` is not a URL this module can store bodies under.
    #[error("invalid storage.files_url {url:?}: {why}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        why: String,
    },
}

impl From<object_store::Error> for BlobError {
    fn from(e: object_store::Error) -> Self {
        BlobError::Store(e)
    }
}

/// Limits and checks applied while a body streams in.
#[derive(Clone, Copy, Debug)]
pub struct WriteLimits {
    /// Largest body accepted.
    pub max_bytes: u64,
    /// Most lines accepted, if limited.
    pub max_lines: Option<u64>,
    /// Reject bodies that are not UTF-8.
    pub require_utf8: bool,
}

/// What was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes in the body.
    pub bytes: u64,
    /// Lines in the body (a last line without newline counts).
    pub lines: u64,
    /// Offset of the first byte that breaks UTF-8, if any (only checked, not rejected, when
    /// [`WriteLimits::require_utf8`] is off).
    pub invalid_utf8_at: Option<u64>,
    /// Bytes in the longest line, newline excluded (batch inputs bound it per line).
    pub longest_line: u64,
    /// 1-based number of the (first) longest line; 0 for an empty body.
    pub longest_line_no: u64,
}

/// File bodies under ids, in a local directory or an object store; cheap to clone (the
/// clones share one connection pool).
#[derive(Clone, Debug)]
pub struct BlobStore {
    backend: Backend,
    /// How [`BlobStore::location`] names an object store: its `s3://bucket/prefix` URL when it
    /// was opened from one.
    url: Option<String>,
}

/// Where the bodies live.
#[derive(Clone, Debug)]
enum Backend {
    /// Files in one directory.
    Local { root: PathBuf },
    /// Objects under `prefix` in `store`.
    Object {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
    },
}

/// Ids are one path segment of `a-z A-Z 0-9 - _ .`, not starting with a dot (temp files do),
/// at most 128 bytes: never a path that leaves the store's directory or prefix.
fn check_id(id: &str) -> Result<(), BlobError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(BlobError::InvalidId(id.to_string()))
    }
}

/// Counts lines and checks UTF-8 across chunk boundaries without buffering the body.
#[derive(Default)]
struct ContentScan {
    bytes: u64,
    lines: u64,
    last_byte: Option<u8>,
    carry: Vec<u8>,
    invalid_utf8_at: Option<u64>,
    /// Bytes of the line being read so far.
    line_len: u64,
    longest_line: u64,
    longest_line_no: u64,
}

impl ContentScan {
    fn feed(&mut self, chunk: &[u8], limits: &WriteLimits) -> Result<(), BlobError> {
        if self.bytes + chunk.len() as u64 > limits.max_bytes {
            return Err(BlobError::TooLarge(limits.max_bytes));
        }
        if self.invalid_utf8_at.is_none() {
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(chunk);
            if let Err(e) = std::str::from_utf8(&buf) {
                if e.error_len().is_some() {
                    let offset =
                        self.bytes - (buf.len() - chunk.len()) as u64 + e.valid_up_to() as u64;
                    if limits.require_utf8 {
                        return Err(BlobError::NotUtf8(offset));
                    }
                    self.invalid_utf8_at = Some(offset);
                } else {
                    self.carry = buf[e.valid_up_to()..].to_vec();
                }
            }
        }
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.end_line(self.line_len + i as u64);
            self.line_len = 0;
            rest = &rest[i + 1..];
        }
        self.line_len += rest.len() as u64;
        self.bytes += chunk.len() as u64;
        if let Some(&b) = chunk.last() {
            self.last_byte = Some(b);
        }
        match limits.max_lines {
            Some(max) if self.lines > max => Err(BlobError::TooManyLines(max)),
            _ => Ok(()),
        }
    }

    /// Counts a line of `len` bytes that just ended.
    fn end_line(&mut self, len: u64) {
        self.lines += 1;
        if len > self.longest_line || self.longest_line_no == 0 {
            self.longest_line = len;
            self.longest_line_no = self.lines;
        }
    }

    fn finish(mut self, limits: &WriteLimits) -> Result<WriteStats, BlobError> {
        if !self.carry.is_empty() && self.invalid_utf8_at.is_none() {
            let offset = self.bytes - self.carry.len() as u64;
            if limits.require_utf8 {
                return Err(BlobError::NotUtf8(offset));
            }
            self.invalid_utf8_at = Some(offset);
        }
        if matches!(self.last_byte, Some(b) if b != b'\n') {
            self.end_line(self.line_len);
        }
        match limits.max_lines {
            Some(max) if self.lines > max => Err(BlobError::TooManyLines(max)),
            _ => Ok(WriteStats {
                bytes: self.bytes,
                lines: self.lines,
                invalid_utf8_at: self.invalid_utf8_at,
                longest_line: self.longest_line,
                longest_line_no: self.longest_line_no,
            }),
        }
    }
}

impl BlobStore {
    /// A store in the local directory `root`, created if missing (the embedded default).
    pub fn open(root: impl Into<PathBuf>) -> Result<BlobStore, BlobError> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(BlobStore {
            backend: Backend::Local { root },
            url: None,
        })
    }

    /// The store `[storage]` names: `files_url` when set (`s3://bucket/prefix`), else the
    /// local `files_dir`.
    pub fn from_config(config: &StorageConfig) -> Result<BlobStore, BlobError> {
        match config.files_url.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => BlobStore::s3(url),
            _ => BlobStore::open(&config.files_dir),
        }
    }

    /// A store under `s3://bucket/prefix`; credentials, region and endpoint come from the
    /// standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, ...), so any S3-compatible service works.
    pub fn s3(url: &str) -> Result<BlobStore, BlobError> {
        BlobStore::s3_from(object_store::aws::AmazonS3Builder::from_env(), url)
    }

    /// [`BlobStore::s3`] with the client settings of `builder` instead of the environment's
    /// (the bucket and the bounded retries are set here alike).
    pub fn s3_from(
        builder: object_store::aws::AmazonS3Builder,
        url: &str,
    ) -> Result<BlobStore, BlobError> {
        let invalid = |why: &str| BlobError::InvalidUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("only s3://bucket/prefix URLs are supported"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("the bucket is missing"));
        }
        let prefix = ObjectPath::parse(prefix.trim_matches('/'))
            .map_err(|e| invalid(&format!("bad prefix: {e}")))?;
        let store = builder
            .with_bucket_name(bucket)
            .with_retry(object_store::RetryConfig {
                max_retries: S3_RETRIES,
                retry_timeout: S3_RETRY_TIMEOUT,
                ..object_store::RetryConfig::default()
            })
            .build()?;
        let mut blobs = BlobStore::object(Arc::new(store), prefix);
        blobs.url = Some(format!("s3://{}", rest.trim_end_matches('/')));
        Ok(blobs)
    }

    /// A store under `prefix` in any [`ObjectStore`] (S3 from [`BlobStore::s3`]; the tests
    /// also use the crate's in-memory store).
    pub fn object(store: Arc<dyn ObjectStore>, prefix: ObjectPath) -> BlobStore {
        BlobStore {
            backend: Backend::Object { store, prefix },
            url: None,
        }
    }

    /// Where the bodies are, for the start-up log: a directory or `store/prefix`.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Local { root } => root.display().to_string(),
            Backend::Object { store, prefix } => self
                .url
                .clone()
                .unwrap_or_else(|| format!("{store}/{prefix}")),
        }
    }

    /// Whether the bodies are in an object store (shared by every machine) rather than a
    /// local directory.
    pub fn is_object_store(&self) -> bool {
        matches!(self.backend, Backend::Object { .. })
    }

    /// The store of the bodies under `segment` (a sub-directory, or a longer prefix): what
    /// keeps training exports apart from file bodies, and one Label Studio instance's exports
    /// apart from another's.
    pub fn under(&self, segment: &str) -> Result<BlobStore, BlobError> {
        check_id(segment)?;
        let backend = match &self.backend {
            Backend::Local { root } => {
                let root = root.join(segment);
                std::fs::create_dir_all(&root)?;
                Backend::Local { root }
            }
            Backend::Object { store, prefix } => Backend::Object {
                store: store.clone(),
                prefix: prefix.clone().join(segment),
            },
        };
        Ok(BlobStore {
            backend,
            url: self.url.as_ref().map(|u| format!("{u}/{segment}")),
        })
    }

    /// Where the body `id` is, for a record a person reads: a local path or `s3://…/id`.
    pub fn locate(&self, id: &str) -> String {
        match &self.backend {
            Backend::Local { root } => root.join(id).display().to_string(),
            Backend::Object { .. } => format!("{}/{id}", self.location()),
        }
    }

    fn local_path(root: &std::path::Path, id: &str) -> Result<PathBuf, BlobError> {
        check_id(id)?;
        Ok(root.join(id))
    }

    fn object_path(prefix: &ObjectPath, id: &str) -> Result<ObjectPath, BlobError> {
        check_id(id)?;
        Ok(prefix.clone().join(id))
    }

    /// Streams a body in under `id`, enforcing `limits`; nothing is kept if a limit is hit.
    pub async fn put_stream<S, E>(
        &self,
        id: &str,
        mut body: S,
        limits: WriteLimits,
    ) -> Result<WriteStats, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut writer = self.writer(id).await?;
        let mut scan = ContentScan::default();
        let result = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| BlobError::Source(e.to_string()))?;
                scan.feed(&chunk, &limits)?;
                writer.write(&chunk).await?;
            }
            scan.finish(&limits)
        }
        .await;
        match result {
            Ok(stats) => {
                writer.finish().await?;
                Ok(stats)
            }
            Err(e) => {
                writer.abort().await;
                Err(e)
            }
        }
    }

    /// Starts writing a body under `id`; it appears only when [`BlobWriter::finish`] is called.
    pub async fn writer(&self, id: &str) -> Result<BlobWriter, BlobError> {
        let inner = match &self.backend {
            Backend::Local { root } => {
                let path = Self::local_path(root, id)?;
                let tmp = root.join(format!(".{id}.{:08x}.tmp", rand::random::<u32>()));
                let file = tokio::fs::File::create(&tmp).await?;
                Inner::Local {
                    file: BufWriter::with_capacity(1 << 16, file),
                    tmp,
                    path,
                }
            }
            Backend::Object { store, prefix } => Inner::Object(ObjectWriter {
                store: store.clone(),
                path: Self::object_path(prefix, id)?,
                buf: Vec::new(),
                upload: None,
                parts: JoinSet::new(),
            }),
        };
        Ok(BlobWriter {
            inner,
            bytes: 0,
            settled: false,
        })
    }

    /// Opens a stored body for streaming reads.
    pub async fn open_read(&self, id: &str) -> Result<BlobReader, BlobError> {
        let not_found = |id: &str| BlobError::NotFound(id.to_string());
        match &self.backend {
            Backend::Local { root } => {
                let path = Self::local_path(root, id)?;
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => not_found(id),
                        _ => BlobError::Io(e),
                    })?;
                Ok(BlobReader(Box::pin(file)))
            }
            Backend::Object { store, prefix } => {
                let path = Self::object_path(prefix, id)?;
                let got = store.get(&path).await.map_err(|e| match e {
                    object_store::Error::NotFound { .. } => not_found(id),
                    other => BlobError::Store(other),
                })?;
                let stream = got.into_stream().map_err(std::io::Error::other);
                Ok(BlobReader(Box::pin(tokio_util::io::StreamReader::new(
                    stream,
                ))))
            }
        }
    }

    /// Removes a body; removing a missing one is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), BlobError> {
        match &self.backend {
            Backend::Local { root } => {
                match tokio::fs::remove_file(Self::local_path(root, id)?).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                }
            }
            Backend::Object { store, prefix } => {
                match store.delete(&Self::object_path(prefix, id)?).await {
                    Err(object_store::Error::NotFound { .. }) | Ok(()) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Removes a body like [`BlobStore::delete`] and answers the bytes it took, or `None`
    /// when there was none (so a caller can report the space it freed).
    pub async fn remove(&self, id: &str) -> Result<Option<u64>, BlobError> {
        match &self.backend {
            Backend::Local { root } => {
                let path = Self::local_path(root, id)?;
                let size = match tokio::fs::metadata(&path).await {
                    Ok(meta) => meta.len(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(Some(size)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Backend::Object { store, prefix } => {
                let path = Self::object_path(prefix, id)?;
                let size = match store.head(&path).await {
                    Ok(meta) => meta.size,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                match store.delete(&path).await {
                    Ok(()) => Ok(Some(size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

/// A stored body being read: a local file or an object's response body, as one
/// [`AsyncRead`] (wrap it in a `BufReader` for lines, or a `ReaderStream` for an HTTP body).
pub struct BlobReader(Pin<Box<dyn AsyncRead + Send>>);

impl AsyncRead for BlobReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.0.as_mut().poll_read(cx, buf)
    }
}

/// A body being written. It appears under its id only when [`BlobWriter::finish`] succeeds; a
/// failed finish, [`BlobWriter::abort`] or a drop (a client gone mid-upload, a cancelled task)
/// throws the partial body away (the local temporary file, or the object store's multipart
/// upload), so a full disk gets its space back and no half-written body is ever visible.
pub struct BlobWriter {
    inner: Inner,
    bytes: u64,
    /// Set once the body is in place or thrown away.
    settled: bool,
}

/// The backend's half of a [`BlobWriter`].
enum Inner {
    /// A hidden temporary file renamed to `path` when complete.
    Local {
        file: BufWriter<tokio::fs::File>,
        tmp: PathBuf,
        path: PathBuf,
    },
    /// An object: buffered until a part is full, then a multipart upload.
    Object(ObjectWriter),
}

/// An object being written: up to [`PART_BYTES`] in `buf`; past that, a multipart upload with
/// at most [`PARTS_IN_FLIGHT`] parts in `parts`.
struct ObjectWriter {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
    parts: JoinSet<object_store::Result<()>>,
}

impl ObjectWriter {
    async fn write(&mut self, mut data: &[u8]) -> Result<(), BlobError> {
        while !data.is_empty() {
            let take = data.len().min(PART_BYTES - self.buf.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == PART_BYTES && !data.is_empty() {
                // A full part and more to come: it goes out as a part of a multipart upload.
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// Sends `buf` as the next part, first waiting for room among the parts in flight.
    async fn send_part(&mut self) -> Result<(), BlobError> {
        if self.upload.is_none() {
            self.upload = Some(self.store.put_multipart(&self.path).await?);
        }
        while self.parts.len() >= PARTS_IN_FLIGHT {
            self.join_one().await?;
        }
        let part = PutPayload::from(std::mem::take(&mut self.buf));
        let upload = self.upload.as_mut().expect("started above");
        self.parts.spawn(upload.put_part(part));
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), BlobError> {
        match self.parts.join_next().await {
            Some(Ok(result)) => Ok(result?),
            Some(Err(e)) => Err(BlobError::Io(std::io::Error::other(e))),
            None => Ok(()),
        }
    }

    /// Puts the body in place: one `PUT` if it never outgrew a part, else the last part and
    /// the multipart upload's completion.
    async fn finish(&mut self) -> Result<(), BlobError> {
        if self.upload.is_none() {
            let body = PutPayload::from(std::mem::take(&mut self.buf));
            self.store.put(&self.path, body).await?;
            return Ok(());
        }
        if !self.buf.is_empty() {
            self.send_part().await?;
        }
        while !self.parts.is_empty() {
            self.join_one().await?;
        }
        self.upload
            .as_mut()
            .expect("checked above")
            .complete()
            .await?;
        self.upload = None;
        Ok(())
    }

    /// Stops the parts in flight and aborts the multipart upload, if one was started.
    async fn abort(&mut self) {
        self.parts.shutdown().await;
        self.buf = Vec::new();
        if let Some(mut upload) = self.upload.take() {
            if let Err(e) = upload.abort().await {
                tracing::warn!(path = %self.path, error = %e, "could not abort a multipart upload");
            }
        }
    }
}

impl BlobWriter {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        match &mut self.inner {
            Inner::Local { file, .. } => file.write_all(data).await?,
            Inner::Object(object) => object.write(data).await?,
        }
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Puts the body in place (locally: flushed, synced and renamed) and answers its size; on
    /// failure the partial body is thrown away.
    pub async fn finish(mut self) -> Result<u64, BlobError> {
        let done = match &mut self.inner {
            Inner::Local { file, tmp, path } => async {
                file.flush().await?;
                file.get_ref().sync_all().await?;
                tokio::fs::rename(&*tmp, &*path).await
            }
            .await
            .map_err(BlobError::from),
            Inner::Object(object) => object.finish().await,
        };
        match done {
            Ok(()) => {
                self.settled = true;
                Ok(self.bytes)
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Throws the partial body away.
    pub async fn abort(mut self) {
        self.settled = true;
        match &mut self.inner {
            Inner::Local { tmp, .. } => {
                let _ = tokio::fs::remove_file(&*tmp).await;
            }
            Inner::Object(object) => object.abort().await,
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped mid-write (the request or task was cancelled): nothing may stay behind.
        match &mut self.inner {
            Inner::Local { tmp, .. } => {
                let _ = std::fs::remove_file(&*tmp);
            }
            Inner::Object(object) => {
                object.parts.abort_all();
                // Nothing is visible before completion; the started upload is aborted in the
                // background so the store does not keep its parts.
                if let (Some(mut upload), Ok(runtime)) =
                    (object.upload.take(), tokio::runtime::Handle::try_current())
                {
                    let path = object.path.clone();
                    runtime.spawn(async move {
                        if let Err(e) = upload.abort().await {
                            tracing::warn!(%path, error = %e, "could not abort a dropped multipart upload");
                        }
                    });
                }
            }
        }
    }
}

/// Retries of one object-storage request (with exponential back-off) before it fails: an
/// outage shows as a 503 within [`S3_RETRY_TIMEOUT`] instead of the crate's 3 minutes.
const S3_RETRIES: usize = 3;

/// Longest time one object-storage request is retried for.
const S3_RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl BlobError {
    /// Whether the object storage could not be reached or answered a server error (its
    /// retries spent): an outage worth a 503 and a retry, not a bug. Refusals that retrying
    /// cannot fix (credentials, permissions, a missing bucket's configuration) are not.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BlobError::Store(object_store::Error::Generic { .. }))
    }

    /// Whether the disk (or the filesystem's quota) is full: worth a 507 and a retry once
    /// space is freed, not a bug. The `io::Error` is looked for along the whole source chain,
    /// so it is found however deep a backend wrapped it.
    pub fn is_storage_full(&self) -> bool {
        let full = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if full(io) {
                    return true;
                }
                // An io::Error's `source` skips the error it wraps; look at that one too.
                if let Some(inner) = io.get_ref() {
                    next = Some(inner);
                    continue;
                }
            }
            next = e.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn limits(max_bytes: u64, max_lines: Option<u64>) -> WriteLimits {
        WriteLimits {
            max_bytes,
            max_lines,
            require_utf8: true,
        }
    }

    fn chunks(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::copy_from_slice(p)))
                .collect::<Vec<_>>(),
        )
    }

    /// A writer dropped mid-body (the upload's request was cancelled) leaves nothing behind;
    /// before, its temporary file stayed, holding the space of a full disk forever.
    #[tokio::test]
    async fn a_dropped_writer_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut writer = store.writer("file-dropped").await.unwrap();
        writer.write(b"half a body").await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(writer);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(matches!(
            store.open_read("file-dropped").await,
            Err(BlobError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn streams_in_and_out_counting_lines_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        // "é" split across two chunks must still count as valid UTF-8.
        let stats = store
            .put_stream(
                "file-a",
                chunks(&[b"one\ntw\xc3", b"\xa9\nthree"]),
                limits(100, Some(3)),
            )
            .await
            .unwrap();
        let expected = WriteStats {
            bytes: 14,
            lines: 3,
            invalid_utf8_at: None,
            longest_line: 5,
            longest_line_no: 3,
        };
        assert_eq!(stats, expected);
        let mut body = String::new();
        store
            .open_read("file-a")
            .await
            .unwrap()
            .read_to_string(&mut body)
            .await
            .unwrap();
        assert_eq!(body, "one\ntwé\nthree");
        store.delete("file-a").await.unwrap();
        assert!(matches!(
            store.open_read("file-a").await,
            Err(BlobError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn limits_reject_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let too_big = store
            .put_stream("f1", chunks(&[b"12345", b"6789"]), limits(8, None))
            .await;
        assert!(matches!(too_big, Err(BlobError::TooLarge(8))));
        let too_many = store
            .put_stream("f2", chunks(&[b"a\nb\nc\n"]), limits(100, Some(2)))
            .await;
        assert!(matches!(too_many, Err(BlobError::TooManyLines(2))));
        let not_utf8 = store
            .put_stream("f3", chunks(&[b"ok\n", b"\xff\n"]), limits(100, None))
            .await;
        assert!(matches!(not_utf8, Err(BlobError::NotUtf8(3))));
        let truncated = store
            .put_stream("f4", chunks(&[b"ok\xc3"]), limits(100, None))
            .await;
        assert!(matches!(truncated, Err(BlobError::NotUtf8(2))));
        let lenient = WriteLimits {
            require_utf8: false,
            ..limits(100, None)
        };
        let noted = store
            .put_stream("f5", chunks(&[b"ok\n", b"\xff\n"]), lenient)
            .await
            .unwrap();
        assert_eq!(noted.invalid_utf8_at, Some(3));
        store.delete("f5").await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no partial files may remain"
        );
    }

    /// The longest line is measured across chunk boundaries without holding it.
    #[tokio::test]
    async fn the_longest_line_is_found_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let stats = store
            .put_stream(
                "f",
                chunks(&[b"ab\nabc", b"def", b"g\n\nxy"]),
                limits(100, None),
            )
            .await
            .unwrap();
        assert_eq!(
            (stats.lines, stats.longest_line, stats.longest_line_no),
            (4, 7, 2)
        );
        let stats = store
            .put_stream("g", chunks(&[b"a\n", b"abcd"]), limits(100, None))
            .await
            .unwrap();
        assert_eq!(
            (stats.lines, stats.longest_line, stats.longest_line_no),
            (2, 4, 2),
            "a last line without newline"
        );
        let stats = store
            .put_stream("h", chunks(&[b"\n\n"]), limits(100, None))
            .await
            .unwrap();
        assert_eq!((stats.longest_line, stats.longest_line_no), (0, 1));
    }

    /// `remove` answers the size it freed, and `None` for a body that is not there.
    #[tokio::test]
    async fn remove_reports_the_bytes_it_freed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        store
            .put_stream("r", chunks(&[b"12345", b"678\n"]), limits(100, None))
            .await
            .unwrap();
        assert_eq!(store.remove("r").await.unwrap(), Some(9));
        assert_eq!(store.remove("r").await.unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(
            store.remove("../r").await,
            Err(BlobError::InvalidId(_))
        ));
    }

    /// The object-store backend over the crate's in-memory store (the same `ObjectStore`
    /// calls S3 gets; the e2e suite runs them against a real S3 server, moto).
    fn in_memory() -> (BlobStore, Arc<object_store::memory::InMemory>) {
        let memory = Arc::new(object_store::memory::InMemory::new());
        let store = BlobStore::object(memory.clone(), ObjectPath::from("pre/fix"));
        (store, memory)
    }

    async fn objects(memory: &object_store::memory::InMemory) -> Vec<String> {
        memory
            .list(None)
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }

    /// A body of several parts goes up as a multipart upload, under the prefix, and streams
    /// back whole; a small one is a single object too.
    #[tokio::test]
    async fn object_bodies_stream_in_parts_and_back() {
        let (store, memory) = in_memory();
        let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
        let total = 2 * PART_BYTES + PART_BYTES / 2;
        let body: Vec<u8> = line.iter().copied().cycle().take(total).collect();
        let chunks = futures::stream::iter(
            body.chunks(1 << 16)
                .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let stats = store
            .put_stream("file-big", chunks, limits(u64::MAX, None))
            .await
            .unwrap();
        assert_eq!(stats.bytes, total as u64);
        assert_eq!(stats.lines, total.div_ceil(line.len()) as u64);
        assert_eq!(objects(&memory).await, ["pre/fix/file-big"]);
        let mut back = Vec::new();
        store
            .open_read("file-big")
            .await
            .unwrap()
            .read_to_end(&mut back)
            .await
            .unwrap();
        assert!(back == body, "the body came back changed");

        let mut small = store.writer("file-small").await.unwrap();
        small.write(b"one line\n").await.unwrap();
        assert_eq!(small.finish().await.unwrap(), 9);
        let mut text = String::new();
        store
            .open_read("file-small")
            .await
            .unwrap()
            .read_to_string(&mut text)
            .await
            .unwrap();
        assert_eq!(text, "one line\n");
        assert_eq!(store.remove("file-big").await.unwrap(), Some(total as u64));
        assert_eq!(store.remove("file-big").await.unwrap(), None);
        store.delete("file-small").await.unwrap();
        store.delete("file-small").await.unwrap();
        assert!(objects(&memory).await.is_empty());
    }

    /// Complete or nothing: a body past its first part that is dropped, aborted or refused by
    /// a limit never becomes visible.
    #[tokio::test]
    async fn object_bodies_are_complete_or_absent() {
        let (store, memory) = in_memory();
        let part = vec![b'x'; PART_BYTES];
        let mut dropped = store.writer("file-dropped").await.unwrap();
        dropped.write(&part).await.unwrap();
        dropped.write(b"more").await.unwrap(); // the first part is on its way
        drop(dropped);
        let mut aborted = store.writer("file-aborted").await.unwrap();
        aborted.write(&part).await.unwrap();
        aborted.write(&part).await.unwrap();
        aborted.abort().await;
        let three_parts = futures::stream::iter(
            (0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from(part.clone()))),
        );
        let too_big = store
            .put_stream(
                "file-too-big",
                three_parts,
                limits(2 * PART_BYTES as u64 + 1, None),
            )
            .await;
        assert!(
            matches!(too_big, Err(BlobError::TooLarge(_))),
            "{too_big:?}"
        );
        let not_utf8 = store
            .put_stream("file-bad", chunks(&[b"ok\n", b"\xff\n"]), limits(100, None))
            .await;
        assert!(matches!(not_utf8, Err(BlobError::NotUtf8(3))));
        assert!(
            objects(&memory).await.is_empty(),
            "{:?}",
            objects(&memory).await
        );
        for id in ["file-dropped", "file-aborted", "file-too-big", "file-bad"] {
            assert!(matches!(
                store.open_read(id).await,
                Err(BlobError::NotFound(_))
            ));
        }
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(
                matches!(store.open_read(bad).await, Err(BlobError::InvalidId(_))),
                "{bad}"
            );
            assert!(matches!(
                store.writer(bad).await,
                Err(BlobError::InvalidId(_))
            ));
        }
    }

    /// A full disk is recognised however deep a backend wrapped the `io::Error`.
    #[test]
    fn storage_full_is_found_along_the_source_chain() {
        let full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        assert!(BlobError::Io(full()).is_storage_full());
        assert!(BlobError::Io(std::io::Error::other(full())).is_storage_full());
        let wrapped = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(full()),
        };
        assert!(BlobError::Store(wrapped).is_storage_full());
        let other = object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::other("connection reset")),
        };
        assert!(!BlobError::Store(other).is_storage_full());
        assert!(!BlobError::NotFound("x".into()).is_storage_full());
    }

    #[test]
    fn only_s3_urls_with_a_bucket_are_accepted() {
        for bad in ["file:///tmp/x", "s3://", "s3:///prefix", "gs://bucket"] {
            assert!(
                matches!(BlobStore::s3(bad), Err(BlobError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn ids_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(
                matches!(store.open_read(bad).await, Err(BlobError::InvalidId(_))),
                "{bad}"
            );
        }
    }
}
