//! Keepalive for an upstream HTTP/2 connection: the task that drives the connection pings it
//! while streams are open and closes it when a ping goes unanswered.
//!
//! Pings run only while streams are open, one at a time, each at least `every` after the
//! previous answer. etcd's gRPC server (grpc-go) counts a ping on a connection without
//! streams, or one sooner than its `--grpc-keepalive-min-time` after the last, as a strike,
//! and closes the connection with GOAWAY `too_many_pings` on the third
//! (`docs/etcd-protocols.md` §7.1). Idle connections are kept alive by the member health
//! checks instead.
//!
//! A stream that opens after a quiet spell (no ping for `every` or longer, or none yet) is
//! pinged at once rather than at the next tick of a fixed schedule: a connection that died
//! silently while idle (its tunnel dropped without FIN or RST) is then given up `timeout`
//! after its next use, and the request on it fails over, instead of waiting up to `every`
//! more. `h2` offers only the ping frames (`PingPong`); the schedule and the timeout are
//! this module's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::poll_fn;
use h2::client::Connection;
use h2::{Ping, PingPong};
use tokio::time::Instant;

use super::{ConnState, Io};

/// Runs a connection until it ends, pinging it while streams are open; marks it closed then.
pub(super) async fn drive(
    conn: Connection<Io, Bytes>,
    pings: Option<PingPong>,
    state: Arc<ConnState>,
    every: Duration,
    timeout: Duration,
) {
    tokio::pin!(conn);
    let ended = |r: Result<(), h2::Error>| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    };
    let Some(mut pp) = pings else {
        ended(conn.await);
        state.closed.store(true, Ordering::Release);
        return;
    };
    // When the last ping was answered: the next may go `every` later.
    let mut answered: Option<Instant> = None;
    loop {
        let due = answered.map(|t| t + every);
        let wake = async {
            if state.open.load(Ordering::Relaxed) == 0 {
                state.opened.notified().await;
            }
            if let Some(due) = due {
                tokio::time::sleep_until(due).await;
            }
        };
        tokio::select! {
            r = &mut conn => {
                ended(r);
                break;
            }
            () = wake => {}
        }
        if state.open.load(Ordering::Relaxed) == 0 {
            continue;
        }
        if pp.send_ping(Ping::opaque()).is_err() {
            // Not expected (one ping at a time); wait a period rather than spin.
            answered = Some(Instant::now());
            continue;
        }
        let pong = tokio::time::timeout(timeout, poll_fn(|cx| pp.poll_pong(cx)));
        tokio::select! {
            r = &mut conn => {
                ended(r);
                break;
            }
            answer = pong => match answer {
                Ok(_) => answered = Some(Instant::now()),
                Err(_) => {
                    tracing::debug!(?timeout, "upstream HTTP/2 ping unanswered; closing the connection");
                    state.unanswered.store(true, Ordering::Release);
                    break;
                }
            },
        }
    }
    // Dropping the connection fails the streams still on it.
    state.closed.store(true, Ordering::Release);
}
