//! A TCP proxy the test controls, to put between a process and the API server:
//! [`Proxy::black_hole`] stops forwarding in both directions without closing
//! anything (what a network partition looks like: connections stay open, bytes
//! go nowhere, new connections are accepted and then hang), and
//! [`Proxy::heal`] forwards again, delivering what was held, as TCP does once
//! a partition heals.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; dropping it stops it (open connections end with it).
pub struct Proxy {
    pub addr: SocketAddr,
    forwarding: Arc<watch::Sender<bool>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let forwarding = Arc::new(watch::Sender::new(true));
        let rx = forwarding.subscribe();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(serve(client, upstream, rx.clone()));
            }
        });
        Proxy {
            addr,
            forwarding,
            task: task.abort_handle(),
        }
    }

    /// Stops forwarding: bytes are held, nothing is closed.
    pub fn black_hole(&self) {
        self.forwarding.send_replace(false);
    }

    /// Forwards again, starting with what was held.
    pub fn heal(&self) {
        self.forwarding.send_replace(true);
    }
}

async fn wait_forwarding(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|on| *on).await;
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<bool>) {
    // A connection made during a black hole hangs until it heals.
    wait_forwarding(&mut rx).await;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, rx.clone()),
        pump(server_read, client_write, rx),
    );
}

/// Copies `from` to `to`, holding every chunk while forwarding is off.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut rx: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_forwarding(&mut rx).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Read while forwarding was on, but maybe off by now: hold it.
        wait_forwarding(&mut rx).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
