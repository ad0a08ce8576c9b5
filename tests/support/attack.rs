//! Hostile clients, as an attacker would write them: no courtesy half-closes, connections held
//! open, requests sent at once. Shared by `tests/hostile.rs` and `benches/hostile.rs`. Every
//! function here bounds its own awaits.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK block that adds one `literal`-byte header to the dynamic table and then references
/// it `refs` times (one byte each): tiny on the wire, `refs × literal` bytes decoded.
pub fn hpack_bomb_block(literal: usize, refs: usize) -> Vec<u8> {
    let mut block = Vec::new();
    // Literal with incremental indexing, new name "x" (RFC 7541 §6.2.1), value not Huffman.
    block.extend_from_slice(&[0x40, 0x01, b'x']);
    put_hpack_int(&mut block, 0x00, 7, literal);
    block.extend(std::iter::repeat_n(b'a', literal));
    // Indexed field 62: the first dynamic table entry (RFC 7541 §6.1).
    block.extend(std::iter::repeat_n(0xbe, refs));
    block
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn put_hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// The HPACK bomb of the issue: preface, SETTINGS, then `block` as one HEADERS frame (or as
/// HEADERS + CONTINUATIONs of `split` bytes).
pub fn hpack_bomb(block: &[u8], split: Option<usize>) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let chunks: Vec<&[u8]> = match split {
        Some(n) => block.chunks(n).collect(),
        None => vec![block],
    };
    for (i, c) in chunks.iter().enumerate() {
        let kind = if i == 0 { 0x1 } else { 0x9 };
        let flags = if i + 1 == chunks.len() { 0x4 } else { 0 };
        out.extend(frame(kind, flags, 1, c));
    }
    out
}

/// A frame header announcing 16 MiB, and 1 KiB of it.
pub fn oversized_frame() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(&[0xff, 0xff, 0xff, 0x1, 0x4, 0, 0, 0, 1]);
    out.extend(vec![0u8; 1024]);
    out
}

/// Connects to `to` from `from` (any loopback address works on Linux: 127.0.0.2 is another
/// client to the proxy).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(super::DEADLINE, socket.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Connects to `to` from the default loopback address.
pub async fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    connect_from(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), to).await
}

/// How a hostile connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// How long after the attack was sent the proxy closed the connection.
    pub after: Duration,
    /// Whether an HTTP/2 GOAWAY came before the close.
    pub goaway: bool,
}

/// Sends `bytes` on `s`, keeps the connection open (no half-close) and reads until the proxy
/// closes it, for at most `limit`; `None` if it is still open then.
pub async fn send_and_hold(mut s: TcpStream, bytes: &[u8], limit: Duration) -> Option<Closed> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let attack = async {
        // The proxy may close before everything is written: that is a close too.
        let _ = s.write_all(bytes).await;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, attack).await.ok()?;
    Some(Closed {
        after: started.elapsed(),
        goaway: has_goaway(&got),
    })
}

/// Whether `server_bytes` (what an HTTP/2 server sent) contain a GOAWAY frame.
pub fn has_goaway(mut b: &[u8]) -> bool {
    while b.len() >= 9 {
        let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
        if b[3] == 0x7 {
            return true;
        }
        b = b.get(9 + len..).unwrap_or_default();
    }
    false
}

/// One JSON-gateway login over a fresh HTTP/1.1 connection from `from`: the status code and
/// body.
pub async fn gateway_login(
    from: IpAddr,
    to: SocketAddr,
    user: &str,
    password: &str,
) -> std::io::Result<(u16, String)> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "login timed out");
    let mut s = connect_from(from, to).await?;
    let body = format!(r#"{{"name":"{user}","password":"{password}"}}"#);
    let req = format!(
        "POST /v3/auth/authenticate HTTP/1.1\r\nHost: {to}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    tokio::time::timeout(super::DEADLINE, async {
        s.write_all(req.as_bytes()).await?;
        s.read_to_string(&mut out).await
    })
    .await
    .map_err(|_| timed_out())??;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

/// A process's resident memory now and at its peak, in KiB (`/proc/PID/status`).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time a process has used (user + system), from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// An HTTP/2 client connection to `to` (prior knowledge, as gRPC clients speak it), its
/// driver running in a task of its own.
pub async fn h2_client<B>(
    to: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = connect(to).await.expect("connect");
    let handshake = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    );
    let (send, conn) = tokio::time::timeout(super::DEADLINE, handshake)
        .await
        .expect("HTTP/2 handshake in time")
        .expect("HTTP/2 handshake");
    (send, tokio::spawn(conn))
}
