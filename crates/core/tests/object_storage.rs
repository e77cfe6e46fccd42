//! The blob store's S3 backend against a real S3-compatible server: moto (`moto[server]` from
//! PyPI, installed by `scripts/test.sh` with the e2e requirements), started here as a process.
//!
//! `BATCHLAB_TEST_MOTO` names the `moto_server` executable; without it the test skips, unless
//! `BATCHLAB_REQUIRE_S3=1` (as `scripts/test.sh` sets), where it fails.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchlab_core::blob::{BlobError, BlobStore, WriteLimits, PART_BYTES};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use tokio::io::AsyncReadExt;

/// A moto server on a free port, killed when dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_moto() -> Option<Moto> {
    let Ok(exe) = std::env::var("BATCHLAB_TEST_MOTO") else {
        assert!(
            std::env::var("BATCHLAB_REQUIRE_S3").as_deref() != Ok("1"),
            "BATCHLAB_REQUIRE_S3=1 but BATCHLAB_TEST_MOTO (the moto_server executable) is not set"
        );
        eprintln!("skipped: set BATCHLAB_TEST_MOTO to a moto_server executable");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&exe)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(&moto.endpoint).await.is_err() {
        assert!(Instant::now() < deadline, "moto did not answer in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some(moto)
}

/// Multipart uploads of `bucket` not completed nor aborted (moto's ListMultipartUploads).
async fn open_uploads(moto: &Moto, bucket: &str) -> usize {
    let xml = reqwest::get(format!("{}/{bucket}?uploads", moto.endpoint))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    xml.matches("<UploadId>").count()
}

async fn read_all(store: &BlobStore, id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    store
        .open_read(id)
        .await
        .unwrap()
        .read_to_end(&mut body)
        .await
        .unwrap();
    body
}

#[tokio::test]
async fn s3_bodies_are_multipart_streamed_and_complete_or_absent() {
    let Some(moto) = start_moto().await else {
        return;
    };
    let bucket = "batchlab-blobs";
    let created = reqwest::Client::new()
        .put(format!("{}/{bucket}", moto.endpoint))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");
    let s3 = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(&moto.endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap();
    let store = BlobStore::object(Arc::new(s3), ObjectPath::from("files"));

    // Two and a half parts: a multipart upload, read back whole.
    let body: Vec<u8> = (0..PART_BYTES * 5 / 2).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(1 << 16)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let limits = WriteLimits {
        max_bytes: u64::MAX,
        max_lines: None,
        require_utf8: false,
    };
    let stats = store
        .put_stream("file-big", futures::stream::iter(chunks), limits)
        .await
        .unwrap();
    assert_eq!(stats.bytes, body.len() as u64);
    assert!(
        read_all(&store, "file-big").await == body,
        "the body came back changed"
    );

    // A small body is one PUT.
    let mut small = store.writer("file-small").await.unwrap();
    small.write(b"a line\n").await.unwrap();
    assert_eq!(small.finish().await.unwrap(), 7);
    assert_eq!(read_all(&store, "file-small").await, b"a line\n");

    // Aborted and dropped bodies past their first part: not visible, and their uploads gone.
    let part = vec![b'x'; PART_BYTES];
    let mut aborted = store.writer("file-aborted").await.unwrap();
    aborted.write(&part).await.unwrap();
    aborted.write(&part).await.unwrap();
    assert_eq!(
        open_uploads(&moto, bucket).await,
        1,
        "past one part, a body goes up as a multipart upload"
    );
    aborted.abort().await;
    let mut dropped = store.writer("file-dropped").await.unwrap();
    dropped.write(&part).await.unwrap();
    dropped.write(b"more").await.unwrap();
    drop(dropped);
    for id in ["file-aborted", "file-dropped"] {
        assert!(matches!(
            store.open_read(id).await,
            Err(BlobError::NotFound(_))
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_uploads(&moto, bucket).await > 0 {
        assert!(
            Instant::now() < deadline,
            "a multipart upload stayed open after its writer was aborted or dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(
        store.remove("file-big").await.unwrap(),
        Some(body.len() as u64)
    );
    assert_eq!(store.remove("file-big").await.unwrap(), None);
    store.delete("file-small").await.unwrap();
    assert!(matches!(
        store.open_read("file-small").await,
        Err(BlobError::NotFound(_))
    ));
}
