//! A TCP proxy on 127.0.0.1 that adds a fixed delay to every byte in each direction, for
//! benchmarks of a path with round-trip time (`bench/network.sh`): what leaves one side at
//! time t arrives at the other at t + delay, at whatever rate the two ends manage, so the
//! bandwidth is the loopback's and the latency is a WAN's.
//!
//!     cargo run --release --example delay_proxy -- LISTEN_PORT UPSTREAM_ADDR ONE_WAY_MS
//!
//! Prints `listening on 127.0.0.1:PORT` (port 0 picks one) and serves until killed.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, upstream, delay_ms] = args.as_slice() else {
        eprintln!("usage: delay_proxy LISTEN_PORT UPSTREAM_ADDR ONE_WAY_MS");
        std::process::exit(2);
    };
    let delay = Duration::from_millis(delay_ms.parse().expect("ONE_WAY_MS: milliseconds"));
    let listener = TcpListener::bind(("127.0.0.1", port.parse().expect("a port"))).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(carry(cr, sw, delay), carry(sr, cw, delay));
        });
    }
}

/// Reads what `from` sends and writes each chunk to `to` once `delay` has passed since it
/// was read; the end of `from` ends `to` after the same delay.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    // Bounded: a slow reader at the far end slows the near one down, as TCP would.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(4096);
    let reader = async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(delay).await;
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
