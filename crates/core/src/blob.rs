//! File bodies in a local directory, streamed both ways so a 200 MB upload never sits in memory.
//!
//! A body is written to a temporary name and renamed into place when complete, so a reader never
//! sees half a file and a failed upload leaves nothing behind.

use std::path::PathBuf;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncWriteExt, BufWriter};

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

/// File bodies stored as files in one directory.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

fn check_id(id: &str) -> Result<(), BlobError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
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
    /// A store rooted at `root`, created if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<BlobStore, BlobError> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(BlobStore { root })
    }

    fn path(&self, id: &str) -> Result<PathBuf, BlobError> {
        check_id(id)?;
        Ok(self.root.join(id))
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
        let path = self.path(id)?;
        let tmp = self
            .root
            .join(format!(".{id}.{:08x}.tmp", rand::random::<u32>()));
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(BlobWriter {
            file: BufWriter::with_capacity(1 << 16, file),
            tmp,
            path,
            bytes: 0,
            settled: false,
        })
    }

    /// Opens a stored body for streaming reads.
    pub async fn open_read(&self, id: &str) -> Result<tokio::fs::File, BlobError> {
        let path = self.path(id)?;
        tokio::fs::File::open(&path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => BlobError::NotFound(id.to_string()),
                _ => BlobError::Io(e),
            })
    }

    /// Removes a body; removing a missing one is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path(id)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Removes a body like [`BlobStore::delete`] and answers the bytes it took on disk, or
    /// `None` when there was none (so a caller can report the space it freed).
    pub async fn remove(&self, id: &str) -> Result<Option<u64>, BlobError> {
        let path = self.path(id)?;
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
}

/// A body being written under a hidden temporary name. It appears under its id only when
/// [`BlobWriter::finish`] succeeds; a failed finish, [`BlobWriter::abort`] or a drop (a client
/// gone mid-upload, a cancelled task) removes the partial body, so a full disk gets its space
/// back and no half-written file is ever visible.
pub struct BlobWriter {
    file: BufWriter<tokio::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    bytes: u64,
    /// Set once the temporary file is renamed into place or removed.
    settled: bool,
}

impl BlobWriter {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.file.write_all(data).await?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Flushes, syncs and moves the body into place; on failure the partial body is removed.
    pub async fn finish(mut self) -> Result<u64, BlobError> {
        let done = async {
            self.file.flush().await?;
            self.file.get_ref().sync_all().await?;
            tokio::fs::rename(&self.tmp, &self.path).await
        }
        .await;
        match done {
            Ok(()) => {
                self.settled = true;
                Ok(self.bytes)
            }
            Err(e) => {
                self.abort().await;
                Err(e.into())
            }
        }
    }

    /// Throws the partial body away.
    pub async fn abort(mut self) {
        self.settled = true;
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.settled {
            // Dropped mid-write (the request or task was cancelled): nothing may stay behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl BlobError {
    /// Whether the disk (or the filesystem's quota) is full: worth a 507 and a retry once
    /// space is freed, not a bug.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, BlobError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull
            || e.kind() == std::io::ErrorKind::QuotaExceeded)
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
