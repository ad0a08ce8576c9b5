//! Keepalive for an upstream HTTP/2 connection: the task that drives the connection pings it
//! while streams are open and closes it when a ping goes unanswered.
//!
//! Pings run only while streams are open, and each one is sent `every` after the previous
//! answer. etcd's gRPC server (grpc-go) counts a ping on a connection without streams, or one
//! sooner than its `--grpc-keepalive-min-time` after the last, as a strike, and closes the
//! connection with GOAWAY `too_many_pings` on the third (`docs/etcd-protocols.md` §7.1).
//! Idle connections are kept alive by the member health checks instead. `h2` offers only the
//! ping frames (`PingPong`); the schedule and the timeout are this module's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::poll_fn;
use h2::client::Connection;
use h2::{Ping, PingPong};

use super::{ConnState, Io};

/// Runs a connection until it ends, pinging it while streams are open; marks it closed then.
pub(super) async fn drive(
    conn: Connection<Io, Bytes>,
    mut pings: Option<PingPong>,
    state: Arc<ConnState>,
    every: Duration,
    timeout: Duration,
) {
    tokio::pin!(conn);
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
                break;
            }
            () = tokio::time::sleep(every) => {
                let Some(pp) = pings.as_mut() else { continue };
                if state.open.load(Ordering::Relaxed) == 0 || pp.send_ping(Ping::opaque()).is_err() {
                    continue;
                }
                let pong = tokio::time::timeout(timeout, poll_fn(|cx| pp.poll_pong(cx)));
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                        }
                        break;
                    }
                    answer = pong => if answer.is_err() {
                        tracing::debug!(?timeout, "upstream HTTP/2 ping unanswered; closing the connection");
                        break;
                    },
                }
            }
        }
    }
    // Dropping the connection fails the streams still on it.
    state.closed.store(true, Ordering::Release);
}
