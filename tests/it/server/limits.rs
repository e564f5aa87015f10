//! `imgcache::server::serve` against clients that misbehave: headers sent half-way, a body
//! never read, connections left idle, more connections than the cap. Raw TCP on 127.0.0.1.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use imgcache::server::{Limits, router, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::setup;
use crate::MB;
use crate::support::origin::{Origin, Route, volume};
use crate::support::wait_until;

/// Serves the router of `cache` under `limits` on a port of its own.
async fn start(
    cache: imgcache::ImageCache,
    limits: Limits,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        serve(listener, router(cache), limits, std::future::pending())
            .await
            .unwrap();
    });
    (addr, task)
}

/// Reads until the server closes the connection (or `within` passes): what it sent, and
/// whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_half_their_headers_are_cut_after_the_header_timeout() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let timeout = Duration::from_millis(300);
    let (addr, _server) = start(cache, Limits::new().header_read_timeout(timeout)).await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    let mut cut = 0;
    for stream in &mut slow {
        let (_, closed) = read_until_closed(stream, Duration::from_secs(10)).await;
        cut += usize::from(closed);
    }
    println!(
        "{cut} of 20 connections cut {} ms after they connected (header timeout {} ms)",
        started.elapsed().as_millis(),
        timeout.as_millis()
    );
    assert_eq!(cut, 20);
    // A client that sends its request in time is served.
    let mut ok = TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut ok, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_cut_and_its_file_let_go() {
    let origin = Origin::start().await;
    origin.route("data/big.nii.gz", Route::ok(volume(3, 24 * MB)));
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    drop(cache.get("big.nii.gz").await.unwrap());
    let send_timeout = Duration::from_millis(300);
    let (addr, _server) = start(cache.clone(), Limits::new().send_timeout(send_timeout)).await;
    // Asks for 24 MB and reads none of it: the socket's buffers fill, and the answer
    // (holding the file) waits.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /files/big.nii.gz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    wait_until(|| cache.stats().pinned_entries == 1).await;
    let held_at = Instant::now();
    for _ in 0..1000 {
        if cache.stats().pinned_entries == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "the stalled reader's file was let go after {} ms (send timeout {} ms)",
        held_at.elapsed().as_millis(),
        send_timeout.as_millis()
    );
    assert_eq!(cache.stats().pinned_entries, 0, "the file is still held");
    let (_, closed) = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert!(closed, "the connection was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_a_slow_answer_is_not() {
    let origin = Origin::start().await;
    // The origin pauses after half the file until released: the answer sends nothing for
    // longer than the idle timeout.
    let (route, resume) = Route::ok(volume(5, MB)).pause_at(MB / 2);
    origin.route("data/slow.nii.gz", route);
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let idle = Duration::from_millis(200);
    let (addr, _server) = start(
        cache,
        Limits::new()
            .idle_timeout(idle)
            .header_read_timeout(Duration::from_millis(100)),
    )
    .await;
    let http = reqwest::Client::new();
    let answer = http
        .get(format!("http://{addr}/files/slow.nii.gz"))
        .send()
        .await
        .unwrap();
    let released = tokio::spawn(async move {
        tokio::time::sleep(4 * idle).await;
        resume.add_permits(1);
    });
    assert_eq!(
        answer.bytes().await.unwrap(),
        volume(5, MB),
        "cut mid-answer"
    );
    released.await.unwrap();
    // A keep-alive connection outlives the header timeout while it is idle (hyper's own
    // header timer would close it then) ...
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        // Longer than the header timeout, shorter than the idle one.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // ... and is closed once idle.
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed, "the idle keep-alive connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_never_comes_is_not_waited_for() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let (addr, _server) = start(
        cache,
        Limits::new().body_read_timeout(Duration::from_millis(300)),
    )
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
        )
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        closed || !answer.is_empty(),
        "a request whose body never came held its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = setup(dir.path(), &origin).await;
    let (addr, _server) = start(
        cache,
        Limits::new()
            .max_connections(2)
            .header_read_timeout(Duration::from_secs(60))
            .idle_timeout(Duration::from_secs(60)),
    )
    .await;
    let mut held = vec![
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    // The third waits in the kernel's queue while the two hold their slots.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /api/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut third, Duration::from_millis(300)).await;
    assert!(answer.is_empty(), "answered beyond the cap");
    // One goes: the third is served.
    drop(held.pop());
    let (answer, closed) = read_until_closed(&mut third, Duration::from_secs(10)).await;
    assert!(closed && answer.starts_with(b"HTTP/1.1 200"));
}
