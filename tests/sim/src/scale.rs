//! Scaling the etcd StatefulSet, one member at a time, the way a
//! well-behaved etcd chart does it.
//!
//! Up (ordinals ascending, like the StatefulSet controller's `OrderedReady`
//! creation): the member is first registered with the running cluster
//! (`member add`), then started with `--initial-cluster-state existing` and
//! an `--initial-cluster` listing every member including itself. etcd only
//! tolerates one added-but-unstarted member, hence one at a time, and the
//! next add waits until this one has published itself (it is "started" in
//! the member list). Only then does its Pod appear, Running and Ready.
//! Deviation: a real Pod is created first (Pending, then Running, then
//! Ready); here it is ADDED already Ready, so a watcher sees a member only
//! once it can serve.
//!
//! Down (highest ordinal first, `pkg/controller/statefulset/stateful_set_control.go`
//! deletes the pod with the largest ordinal): the StatefulSet controller
//! deletes the Pod, which the apiserver records by setting
//! `deletionTimestamp` (a MODIFIED event); the chart's preStop hook removes
//! the member from the cluster (`member remove` through a remaining member);
//! etcd then stops itself; the tunnels into the pod die with it; finally the
//! kubelet confirms the deletion and the Pod is gone (DELETED).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::etcd::{self, Member, MemberSpec};
use crate::membership::Cluster;
use crate::objects::{self, PodState};
use crate::{Shared, SimError};

/// Bound on one member's add/start/publish or remove/stop.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// How long a removed member gets to stop by itself.
const EXIT_DEADLINE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

fn cluster(shared: &Shared, except: Option<&str>) -> Cluster {
    Cluster {
        endpoints: shared
            .members()
            .iter()
            .filter(|m| Some(m.spec.name.as_str()) != except)
            .map(|m| m.spec.client_url())
            .collect(),
        v2: shared.cfg.enable_v2,
    }
}

/// Adds, starts and publishes the member with this ordinal, then creates its Pod.
pub(crate) async fn add_member(shared: &Arc<Shared>, ordinal: usize) -> Result<(), SimError> {
    let deadline = Instant::now() + STEP_DEADLINE;
    let existing = shared.members();
    let template = existing
        .first()
        .map(|m| m.spec.clone())
        .ok_or_else(|| SimError::Config("cannot scale up from zero members".into()))?;
    let id = &shared.store.id;
    let name = id.pod_name(ordinal);
    let member_dir = shared.root.join(&name);
    let data_dir = member_dir.join("data");
    if data_dir.exists() {
        // The StatefulSet keeps the PVC of a scaled-down pod; a well-behaved
        // chart wipes the stale data of a removed member before rejoining
        // (etcd refuses to start on it: "member has already been removed").
        std::fs::remove_dir_all(&data_dir)
            .map_err(|e| SimError::io(format!("removing {}", data_dir.display()), e))?;
    }
    std::fs::create_dir_all(&member_dir)
        .map_err(|e| SimError::io(format!("creating {}", member_dir.display()), e))?;
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut spec = MemberSpec {
        name: name.clone(),
        pod: name.clone(),
        client_ip: template.client_ip,
        client_port: etcd::free_port(template.client_ip)?,
        peer_port: etcd::free_port(lo)?,
        data_dir,
        log_path: member_dir.join("etcd.log"),
        initial_cluster: String::new(),
        cluster_token: template.cluster_token.clone(),
        join_existing: true,
        advertise_client_url: id.advertised_client_url(ordinal),
        enable_v2: template.enable_v2,
        tls: None,
        metrics_port: None,
    };
    spec.initial_cluster = existing
        .iter()
        .map(|m| &m.spec)
        .chain(std::iter::once(&spec))
        .map(|s| format!("{}={}", s.name, s.peer_url()))
        .collect::<Vec<_>>()
        .join(",");

    let peers = cluster(shared, None);
    peers.add(&name, &spec.peer_url(), deadline).await?;
    let member = Arc::new(Member::new(spec));
    let ip = shared.store.alloc_ip();
    member.set_pod_addr(crate::pod_addr(shared.store.cidr(), &ip));
    let started = async {
        member.spawn()?;
        member.wait_healthy(deadline).await?;
        wait_published(&peers, &name, deadline).await
    };
    if let Err(e) = started.await {
        let _ = member.kill().await;
        return Err(e);
    }
    shared.add_member(member);
    shared.store.add_pod(PodState::new(ordinal, name, ip)?);
    Ok(())
}

/// Polls the member list until `name` has published itself (etcd lists a
/// member without a name until it has started).
async fn wait_published(peers: &Cluster, name: &str, deadline: Instant) -> Result<(), SimError> {
    loop {
        let listed = peers.list().await;
        if let Ok(list) = &listed {
            if list
                .iter()
                .any(|m| m.name == name && !m.client_urls.is_empty())
            {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(SimError::Membership {
                action: format!("waiting for {name} to publish itself"),
                reason: match listed {
                    Ok(list) => format!("member list: {list:?}"),
                    Err(e) => e.to_string(),
                },
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deletes the pod `name`: deletionTimestamp, member remove, etcd stops,
/// tunnels cut, Pod gone.
pub(crate) async fn remove_member(shared: &Arc<Shared>, name: &str) -> Result<(), SimError> {
    let member = shared
        .member(name)
        .ok_or_else(|| SimError::NoSuchPod(name.to_string()))?;
    let deadline = Instant::now() + STEP_DEADLINE;
    shared.store.update_pod(name, |p| {
        if p.deleting.is_some() {
            return false;
        }
        p.deleting = Some(objects::now());
        true
    });
    let peers = cluster(shared, Some(name));
    peers.remove(&member.spec.peer_url(), deadline).await?;
    member
        .wait_exit_or_kill(Instant::now() + EXIT_DEADLINE)
        .await?;
    shared.remove_member(name);
    // Whatever the process exit did not already end (a dial that failed, a
    // socket waiting for its Close) goes with the pod's sandbox.
    shared.tunnels.cut_pod(name);
    shared.store.remove_pod(name);
    Ok(())
}
