//! `get_stream`: bytes before the download ends, for any number of readers, and never a
//! clean end after wrong or partial bytes.

use std::time::Duration;

use futures_util::StreamExt;
use imgcache::{CacheStatus, GetOptions};
use tokio::io::AsyncReadExt;

use crate::MB;
use crate::support::origin::{Fault, Origin, Route, sha256_hex, volume};
use crate::support::{open, open_without_retries};

/// Reads the whole stream, or the error that ended it (with what came before it).
async fn drain(mut stream: imgcache::FileStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => got.extend_from_slice(&chunk),
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_hands_out_bytes_before_the_download_ends_and_ends_after_the_commit() {
    let origin = Origin::start().await;
    let body = volume(1, 8 * MB);
    let (route, gate) = Route::ok(body.clone()).pause_at(2 * MB);
    origin.route("ct/1.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let mut stream = cache.get_stream(origin.url("ct/1.nii.gz")).await.unwrap();
    assert_eq!(
        stream.len(),
        Some(8 * MB as u64),
        "the origin's length, at once"
    );
    assert_eq!(stream.status(), CacheStatus::Downloaded);
    // The origin has sent 2 MB and waits: those 2 MB arrive.
    let mut first = vec![0u8; 2 * MB];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first, body[..2 * MB]);
    assert_eq!(cache.stats().entries_count, 0, "nothing committed yet");
    assert_eq!(cache.stats().downloads_in_progress, 1);
    gate.add_permits(1);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, body[2 * MB..]);
    // The end came after the commit.
    assert_eq!(cache.stats().entries_count, 1);
    assert_eq!(origin.hits("ct/1.nii.gz"), 1);
    let hit = cache.get_stream(origin.url("ct/1.nii.gz")).await.unwrap();
    assert_eq!(hit.status(), CacheStatus::Hit);
    let (bytes, err) = drain(hit).await;
    assert!(err.is_none());
    assert_eq!(sha256_hex(&bytes), sha256_hex(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_readers_joining_at_different_times_share_one_origin_get() {
    let origin = Origin::start().await;
    let body = volume(2, 12 * MB);
    origin.route("ct/2.nii.gz", Route::ok(body.clone()).rate(24 * MB as u64));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("ct/2.nii.gz");
    let mut readers = Vec::new();
    for i in 0..10u64 {
        let (cache, url) = (cache.clone(), url.clone());
        readers.push(tokio::spawn(async move {
            let mut stream = cache.get_stream(&url).await.unwrap();
            let mut got = Vec::new();
            while let Some(chunk) = stream.next().await {
                got.extend_from_slice(&chunk.unwrap());
                // Each at its own pace: the odd ones slower than the origin.
                if i % 2 == 1 {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                // One leaves early: the others and the download go on.
                if i == 4 && got.len() > 3 * MB {
                    return None;
                }
            }
            Some(got)
        }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut finished = 0;
    for reader in readers {
        if let Some(got) = reader.await.unwrap() {
            assert_eq!(got.len(), body.len());
            assert!(got == body, "a reader got other bytes");
            finished += 1;
        }
    }
    assert_eq!(finished, 9);
    assert_eq!(origin.hits("ct/2.nii.gz"), 1, "one GET for all of them");
    assert_eq!(cache.stats().entries_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_off_ends_every_stream_in_an_error() {
    let origin = Origin::start().await;
    let body = volume(3, 6 * MB);
    origin.route(
        "cut.nii.gz",
        Route::ok(body.clone())
            .fault(Fault::CloseAfter(3 * MB))
            .ignore_range(),
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open_without_retries(dir.path()).await;
    let url = origin.url("cut.nii.gz");
    let streams = futures_util::future::join_all((0..3).map(|_| cache.get_stream(&url))).await;
    for stream in streams {
        let (got, err) = drain(stream.unwrap()).await;
        let err = err.expect("an error, never a clean end after partial bytes");
        assert!(got.len() <= 3 * MB && body.starts_with(&got));
        let kind = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<imgcache::Error>())
            .map(imgcache::Error::kind);
        assert_eq!(kind, Some(imgcache::ErrorKind::Incomplete), "{err}");
    }
    assert_eq!(cache.stats().entries_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_that_does_not_match_ends_the_stream_in_an_error() {
    let origin = Origin::start().await;
    let body = volume(4, 3 * MB);
    origin.route("sum.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let stream = cache
        .get_stream_with(
            origin.url("sum.nii.gz"),
            GetOptions::new().expected_sha256("0".repeat(64)),
        )
        .await
        .unwrap();
    let (_, err) = drain(stream).await;
    let err = err.expect("an error at the end");
    let kind = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<imgcache::Error>())
        .map(imgcache::Error::kind);
    assert_eq!(kind, Some(imgcache::ErrorKind::ChecksumMismatch));
    assert_eq!(cache.stats().entries_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_come_from_disk_when_there_and_wait_for_the_rest_otherwise() {
    let origin = Origin::start().await;
    let body = volume(5, 8 * MB);
    let (route, gate) = Route::ok(body.clone()).pause_at(2 * MB);
    origin.route("r.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("r.nii.gz");
    // Starts the download and waits until its first 2 MB are on disk.
    let mut head = cache.get_stream(&url).await.unwrap();
    let mut first = vec![0u8; 2 * MB];
    head.read_exact(&mut first).await.unwrap();
    let start = MB as u64;
    let inside = cache
        .get_stream_range(&url, GetOptions::new(), start, Some(start + 1000))
        .await
        .unwrap();
    assert_eq!(inside.len(), Some(1000));
    assert_eq!(inside.status(), CacheStatus::Coalesced);
    let beyond = cache
        .get_stream_range(&url, GetOptions::new(), 6 * MB as u64, None)
        .await
        .unwrap();
    assert_eq!(beyond.len(), Some(2 * MB as u64));
    let beyond = tokio::spawn(drain(beyond));
    // The part on disk is there at once, but for its last byte, which waits for the
    // commit: a client that counts bytes never holds a whole range before it is verified.
    let mut inside = inside;
    let mut part = vec![0u8; 999];
    inside.read_exact(&mut part).await.unwrap();
    assert_eq!(part, body[MB..MB + 999]);
    let last = tokio::spawn(drain(inside));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!last.is_finished() && !beyond.is_finished());
    gate.add_permits(1);
    let (rest, err) = beyond.await.unwrap();
    assert!(err.is_none());
    assert_eq!(rest, body[6 * MB..]);
    let (last, err) = last.await.unwrap();
    assert!(err.is_none());
    assert_eq!(last, body[MB + 999..MB + 1000]);
    assert_eq!(cache.stats().entries_count, 1);
    drop(head);
    assert_eq!(origin.hits("r.nii.gz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_from_byte_zero_fails_the_readers_that_had_bytes_and_not_the_others() {
    let origin = Origin::start().await;
    let body = volume(6, 6 * MB);
    // The first answer pauses at 1 MB, then is cut at 2 MB; the retry's answer ignores the
    // Range and starts again from byte zero.
    let (first, gate) = Route::ok(body.clone())
        .fault(Fault::CloseAfter(2 * MB))
        .pause_at(MB);
    origin.route_seq(
        "z.nii.gz",
        vec![first, Route::ok(body.clone()).ignore_range()],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("z.nii.gz");
    let mut early = cache.get_stream(&url).await.unwrap();
    let mut head = vec![0u8; MB / 2];
    early.read_exact(&mut head).await.unwrap();
    assert_eq!(head, body[..MB / 2]);
    // Joined before the restart, but has read nothing yet.
    let idle = cache.get_stream(&url).await.unwrap();
    assert_eq!(idle.status(), CacheStatus::Coalesced);
    gate.add_permits(1);
    let (_, err) = drain(early).await;
    let err = err.expect("bytes read before the restart cannot be those of the new download");
    assert!(err.to_string().contains("started again"), "{err}");
    let (got, err) = drain(idle).await;
    assert!(err.is_none(), "{err:?}");
    assert!(
        got == body,
        "the reader that had read nothing gets the whole file"
    );
    assert_eq!(origin.hits("z.nii.gz"), 2);
    assert_eq!(cache.stats().entries_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_that_changes_between_attempts_fails_the_announced_streams() {
    let origin = Origin::start().await;
    let old = volume(7, 4 * MB);
    let new = volume(8, 3 * MB);
    let (first, gate) = Route::ok(old.clone())
        .fault(Fault::CloseAfter(2 * MB))
        .pause_at(MB);
    origin.route_seq(
        "len.nii.gz",
        vec![first, Route::ok(new.clone()).ignore_range()],
    );
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("len.nii.gz");
    // Both were told 4 MB (a sidecar would have sent it as Content-Length).
    let read = cache.get_stream(&url).await.unwrap();
    let unread = cache.get_stream(&url).await.unwrap();
    assert_eq!(
        (read.len(), unread.len()),
        (Some(4 * MB as u64), Some(4 * MB as u64))
    );
    let mut read = read;
    let mut head = vec![0u8; 1000];
    read.read_exact(&mut head).await.unwrap();
    gate.add_permits(1);
    for stream in [read, unread] {
        let (got, err) = drain(stream).await;
        let err = err.expect("a stream never ends cleanly at another length than it said");
        assert!(got.len() < 4 * MB, "{err}");
    }
    let file = cache.get(&url).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), new);
    assert_eq!(origin.hits("len.nii.gz"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_that_starts_past_the_end_is_an_error_not_an_empty_file() {
    let origin = Origin::start().await;
    let body = volume(9, 2 * MB);
    let (route, gate) = Route::ok(body.clone()).pause_at(MB);
    origin.route("eof.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("eof.nii.gz");
    let size = body.len() as u64;
    // While downloading, and on a hit.
    let during = cache
        .get_stream_range(&url, GetOptions::new(), size + 10, None)
        .await
        .unwrap();
    let (got, err) = drain(during).await;
    assert!(got.is_empty());
    let err = err.expect("an error during the download");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    gate.add_permits(1);
    drop(cache.get(&url).await.unwrap());
    for (start, end) in [(size + 10, None), (size - 10, Some(size + 10))] {
        let hit = cache
            .get_stream_range(&url, GetOptions::new(), start, end)
            .await
            .unwrap();
        assert_eq!(hit.status(), CacheStatus::Hit);
        let (got, err) = drain(hit).await;
        let err = err.expect("an error on a hit");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(got, body[(start.min(size) as usize)..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_without_a_length_streams_too_and_the_end_repeats() {
    let origin = Origin::start().await;
    let body = volume(10, 3 * MB);
    let (route, gate) = Route::ok(body.clone()).fault(Fault::Chunked).pause_at(MB);
    origin.route("chunked.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("chunked.nii.gz");
    // Opens while the origin holds the rest: no length to wait for.
    let mut stream = cache.get_stream(&url).await.unwrap();
    assert_eq!(stream.len(), None);
    let mut head = vec![0u8; 1000];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head, body[..1000]);
    gate.add_permits(1);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest == body[1000..]);
    // Polled again after its end, it ends again.
    assert_eq!(stream.read(&mut head).await.unwrap(), 0);
    assert!(stream.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_without_a_length_fails_the_stream_that_announced_one() {
    let origin = Origin::start().await;
    let body = volume(11, 4 * MB);
    let (first, gate) = Route::ok(body.clone())
        .fault(Fault::CloseAfter(2 * MB))
        .pause_at(MB);
    let retry = Route::ok(body.clone()).fault(Fault::Chunked).ignore_range();
    origin.route_seq("nolen.nii.gz", vec![first, retry]);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("nolen.nii.gz");
    // Told 4 MB, it has read nothing yet: the retry's bytes cannot be vouched for at
    // that length before the commit, so it never hands out the whole file early.
    let stream = cache
        .get_stream_range(&url, GetOptions::new(), 3 * MB as u64, None)
        .await
        .unwrap();
    assert_eq!(stream.len(), Some(MB as u64));
    gate.add_permits(1);
    let (_, err) = drain(stream).await;
    assert!(err.is_some(), "the length it announced is no longer known");
    assert_eq!(
        std::fs::read(cache.get(&url).await.unwrap().path()).unwrap(),
        body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_leaves_early_is_counted_as_a_miss() {
    let origin = Origin::start().await;
    let body = volume(12, 4 * MB);
    let (route, gate) = Route::ok(body).pause_at(MB);
    origin.route("early.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let url = origin.url("early.nii.gz");
    let mut first = cache.get_stream(&url).await.unwrap();
    let joined = cache.get_stream(&url).await.unwrap();
    let mut header = [0u8; 352];
    first.read_exact(&mut header).await.unwrap();
    drop((first, joined));
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.coalesced_waits), (2, 1));
    gate.add_permits(1);
    drop(cache.get(&url).await.unwrap());
    assert_eq!(
        origin.hits("early.nii.gz"),
        1,
        "the download went on without them"
    );
}

#[cfg(feature = "server")]
mod sidecar {
    use std::time::{Duration, Instant};

    use futures_util::StreamExt;
    use imgcache::ImageCache;
    use imgcache::server::{ServerOptions, router_with};

    use crate::MB;
    use crate::support::origin::{Fault, Origin, Route, sha256_hex, volume};

    async fn serve(cache: ImageCache) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router_with(cache, ServerOptions::new());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), task)
    }

    async fn cache(dir: &std::path::Path, origin: &Origin, retries: u32) -> ImageCache {
        ImageCache::builder()
            .cache_dir(dir)
            .image_server(origin.url("data"))
            .sweep_interval(Duration::ZERO)
            .network(|n| n.retries(retries))
            .network(|n| n.retry_base_delay(Duration::from_millis(1)))
            .build()
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cold_file_reaches_the_client_while_it_is_downloading() {
        let origin = Origin::start().await;
        let body = volume(20, 20 * MB);
        origin.route(
            "data/ct/t.nii.gz",
            Route::ok(body.clone()).rate(20 * MB as u64),
        );
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), &origin, 3).await;
        let (base, server) = serve(cache.clone()).await;
        let started = Instant::now();
        let response = reqwest::get(format!("{base}/files/ct/t.nii.gz"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["cache-status"],
            "imgcache; fwd=miss; detail=streamed"
        );
        assert_eq!(response.headers()["content-length"], (20 * MB).to_string());
        let mut body_stream = response.bytes_stream();
        let first = body_stream.next().await.unwrap().unwrap();
        let first_byte = started.elapsed();
        // The first bytes came while the download ran: nothing is committed yet.
        assert!(!first.is_empty());
        assert_eq!(cache.stats().entries_count, 0);
        assert_eq!(cache.stats().downloads_in_progress, 1);
        let mut got = first.to_vec();
        while let Some(chunk) = body_stream.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        eprintln!(
            "first byte after {first_byte:?}, whole file after {:?}",
            started.elapsed()
        );
        assert_eq!(sha256_hex(&got), sha256_hex(&body));
        assert_eq!(
            cache.stats().entries_count,
            1,
            "complete only once committed"
        );
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_joining_at_different_times_and_one_leaving_share_one_get() {
        let origin = Origin::start().await;
        let body = volume(21, 12 * MB);
        origin.route(
            "data/j.nii.gz",
            Route::ok(body.clone()).rate(24 * MB as u64),
        );
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), &origin, 3).await;
        let (base, server) = serve(cache.clone()).await;
        let http = reqwest::Client::new();
        let mut clients = Vec::new();
        for i in 0..10 {
            let (http, url) = (http.clone(), format!("{base}/files/j.nii.gz"));
            clients.push(tokio::spawn(async move {
                let response = http.get(url).send().await.unwrap();
                let mut stream = response.bytes_stream();
                let mut got = Vec::new();
                while let Some(chunk) = stream.next().await {
                    got.extend_from_slice(&chunk.unwrap());
                    if i == 3 && got.len() > 2 * MB {
                        return None; // this client goes away mid-body
                    }
                    if i % 3 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Some(got)
            }));
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let mut complete = 0;
        for client in clients {
            if let Some(got) = client.await.unwrap() {
                assert!(got == body, "a client got other bytes");
                complete += 1;
            }
        }
        assert_eq!(complete, 9);
        assert_eq!(origin.hits("data/j.nii.gz"), 1);
        assert_eq!(cache.stats().entries_count, 1);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_origin_that_cuts_the_body_makes_every_client_fail() {
        let origin = Origin::start().await;
        let body = volume(22, 6 * MB);
        origin.route(
            "data/cut.nii.gz",
            Route::ok(body)
                .fault(Fault::CloseAfter(3 * MB))
                .ignore_range()
                .rate(12 * MB as u64),
        );
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), &origin, 0).await;
        let (base, server) = serve(cache.clone()).await;
        let http = reqwest::Client::new();
        let clients = (0..4).map(|_| {
            let (http, url) = (http.clone(), format!("{base}/files/cut.nii.gz"));
            tokio::spawn(async move {
                let response = http.get(url).send().await.unwrap();
                response.bytes().await
            })
        });
        for client in futures_util::future::join_all(clients).await {
            assert!(
                client.unwrap().is_err(),
                "a cut body is never a complete answer"
            );
        }
        assert_eq!(cache.stats().entries_count, 0);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_range_of_a_file_still_downloading_is_served() {
        let origin = Origin::start().await;
        let body = volume(23, 8 * MB);
        let (route, gate) = Route::ok(body.clone()).pause_at(2 * MB);
        origin.route("data/r.nii.gz", route);
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), &origin, 3).await;
        let (base, server) = serve(cache.clone()).await;
        let http = reqwest::Client::new();
        let url = format!("{base}/files/r.nii.gz");
        let whole = tokio::spawn({
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(url).send().await.unwrap().bytes().await.unwrap() }
        });
        origin.wait_for_hits("data/r.nii.gz", 1).await;
        // The answer to a range inside what is on disk comes while the origin is paused:
        // its headers and all but its last byte, which waits for the commit.
        let inside = http
            .get(&url)
            .header("range", "bytes=1000-1999")
            .send()
            .await
            .unwrap();
        assert_eq!(inside.status(), 206);
        assert_eq!(
            inside.headers()["cache-status"],
            "imgcache; fwd=miss; collapsed; detail=streamed"
        );
        assert_eq!(
            inside.headers()["content-range"],
            format!("bytes 1000-1999/{}", 8 * MB).as_str()
        );
        assert_eq!(inside.headers()["content-length"], "1000");
        let mut inside = inside.bytes_stream();
        let mut early = Vec::new();
        while early.len() < 999 {
            early.extend_from_slice(&inside.next().await.unwrap().unwrap());
        }
        assert_eq!(early, body[1000..1999]);
        assert_eq!(cache.stats().entries_count, 0, "before the commit");
        let beyond = tokio::spawn({
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http
                    .get(url)
                    .header("range", "bytes=7340032-")
                    .send()
                    .await
                    .unwrap();
                let content_range = r.headers()["content-range"].to_str().unwrap().to_owned();
                (r.status(), content_range, r.bytes().await.unwrap())
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!beyond.is_finished(), "a range past what is on disk waits");
        gate.add_permits(1);
        let mut last = Vec::new();
        while let Some(chunk) = inside.next().await {
            last.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(last, body[1999..2000]);
        let (status, content_range, bytes) = beyond.await.unwrap();
        assert_eq!(status, 206);
        assert_eq!(
            content_range,
            format!("bytes 7340032-{}/{}", 8 * MB - 1, 8 * MB)
        );
        assert_eq!(bytes, body[7_340_032..]);
        assert_eq!(whole.await.unwrap(), body);
        assert_eq!(origin.hits("data/r.nii.gz"), 1);
        let stats = cache.stats();
        assert_eq!(
            (stats.misses, stats.coalesced_waits),
            (3, 2),
            "one miss per client, two of them joined"
        );
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http_1_0_client_of_a_chunked_origin_gets_the_committed_file() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let origin = Origin::start().await;
        let body = volume(24, 3 * MB);
        origin.route(
            "data/c.nii.gz",
            Route::ok(body.clone()).fault(Fault::Chunked),
        );
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path(), &origin, 0).await;
        let (base, server) = serve(cache.clone()).await;
        // HTTP/1.0 has no chunked framing: a streamed body of unknown length would end at
        // the connection's close, which looks the same as a failure's.
        let addr = base.strip_prefix("http://").unwrap();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /files/c.nii.gz HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&answer[..split]).to_lowercase();
        assert!(head.starts_with("http/1.0 200"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(
            head.contains("cache-status: imgcache; fwd=miss\r\n"),
            "{head}"
        );
        assert!(answer[split + 4..] == body[..]);
        assert_eq!(cache.stats().entries_count, 1);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn if_range_an_expired_copy_and_a_query_are_answered_as_for_a_file() {
        use std::sync::Arc;
        let origin = Origin::start().await;
        let body = volume(25, 2 * MB);
        let (route, gate) = Route::ok(body.clone()).etag("\"v1\"").pause_at(MB);
        origin.route_seq(
            "data/v.nii.gz",
            vec![route, Route::status(304).etag("\"v1\"")],
        );
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(imgcache::ManualClock::new());
        let cache = ImageCache::builder()
            .cache_dir(dir.path())
            .image_server(origin.url("data"))
            .sweep_interval(Duration::ZERO)
            .default_ttl(Duration::from_secs(60))
            .clock(Arc::clone(&clock) as Arc<dyn imgcache::Clock>)
            .build()
            .await
            .unwrap();
        let (base, server) = serve(cache.clone()).await;
        let http = reqwest::Client::new();
        // A resume of some earlier version while this one downloads: the whole file, 200.
        let resumed = tokio::spawn({
            let (http, url) = (http.clone(), format!("{base}/files/v.nii.gz"));
            async move {
                let r = http
                    .get(url)
                    .header("range", "bytes=100-")
                    .header("if-range", "\"some-old-sha\"")
                    .send()
                    .await
                    .unwrap();
                let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
                (r.status(), kind, r.bytes().await.unwrap())
            }
        });
        origin.wait_for_hits("data/v.nii.gz", 1).await;
        gate.add_permits(1);
        let (status, kind, bytes) = resumed.await.unwrap();
        assert_eq!(status, 200);
        assert!(bytes == body);
        assert!(
            !kind.contains("svg"),
            "the type comes from the path: {kind}"
        );
        // Expired: renewed by a 304 and served as a file, with its validators and ranges.
        clock.advance(Duration::from_secs(120));
        let r = http
            .get(format!("{base}/files/v.nii.gz"))
            .header("range", "bytes=0-9")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(
            r.headers()["cache-status"],
            "imgcache; fwd=stale; fwd-status=304"
        );
        assert!(r.headers().contains_key("etag"));
        assert_eq!(r.bytes().await.unwrap(), body[..10]);
        assert_eq!(origin.hits("data/v.nii.gz"), 2);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_origin_failing_on_an_expired_file_gets_the_stale_copy_as_a_file() {
        use std::sync::Arc;
        let origin = Origin::start().await;
        let body = volume(26, MB);
        let cut = Route::ok(body.clone())
            .fault(Fault::CloseAfter(0))
            .ignore_range();
        origin.route_seq("data/s.nii.gz", vec![Route::ok(body.clone()), cut]);
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(imgcache::ManualClock::new());
        let cache = ImageCache::builder()
            .cache_dir(dir.path())
            .image_server(origin.url("data"))
            .sweep_interval(Duration::ZERO)
            .default_ttl(Duration::from_secs(60))
            .network(|n| n.retries(0))
            .clock(Arc::clone(&clock) as Arc<dyn imgcache::Clock>)
            .build()
            .await
            .unwrap();
        drop(cache.get("s.nii.gz").await.unwrap());
        clock.advance(Duration::from_secs(120));
        let (base, server) = serve(cache.clone()).await;
        let r = reqwest::get(format!("{base}/files/s.nii.gz"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["cache-status"],
            "imgcache; fwd=stale; detail=origin-failed"
        );
        assert!(r.headers().contains_key("etag"));
        assert!(r.bytes().await.unwrap() == body);
        assert_eq!(origin.hits("data/s.nii.gz"), 2);
        server.abort();
    }
}
