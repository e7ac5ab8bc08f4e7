//! The engine's view of Proxmox: the few reads and mutations reconcile needs, as a trait.
//!
//! Owns: [`Pve`], its implementation over [`crate::proxmox::Client`], and how a guest is
//! observed for planning ([`ActualGuest`]: status/current for HA, lock and template, plus
//! the raw config with pending values merged in). The trait is the seam that lets the
//! executor's ordering be tested against an in-memory node; production uses the client.
//!
//! Must never: offer a mutation without a `&GuestPermit` (the permit is the queue's proof).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use felhom_protocol::Vmid;

use super::plan::ActualGuest;
use crate::proxmox::GuestPermit;
use crate::proxmox::{
    Client, ConfigChange, GuestKind, ProxmoxError, SetConfigOutcome, TaskDone, TaskListFilter,
    TaskSource, Upid, WaitOptions,
};

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One guest of the node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSummary {
    pub vmid: Vmid,
    pub kind: GuestKind,
    pub status: String,
}

/// What reconcile needs from Proxmox.
pub trait Pve: Send + Sync + 'static {
    /// All guests of the node, both kinds.
    fn list(&self) -> BoxFut<'_, Result<Vec<GuestSummary>, ProxmoxError>>;
    /// Status (with HA, lock, template) and config of one guest.
    fn guest(&self, kind: GuestKind, vmid: Vmid) -> BoxFut<'_, Result<ActualGuest, ProxmoxError>>;
    fn start<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>>;
    /// Graceful shutdown within `timeout` (no forced stop: the engine decides that).
    fn shutdown<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
        timeout: Duration,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>>;
    fn stop<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>>;
    fn set_config<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
        change: &'a ConfigChange,
    ) -> BoxFut<'a, Result<SetConfigOutcome, ProxmoxError>>;
    /// Waits until the task stops; `Err(TaskFailed)` if it failed.
    fn wait<'a>(
        &'a self,
        upid: &'a Upid,
        timeout: Duration,
    ) -> BoxFut<'a, Result<TaskDone, ProxmoxError>>;
    /// Our token's oldest task of `task_type` for `vmid` started at or after `since`
    /// (epoch seconds) that is not in `exclude`: how an intent without a recorded UPID
    /// finds what it started. `exclude` holds the UPIDs the journal already knows for the
    /// guest, so an earlier action's task started in the same second is never adopted.
    fn find_task<'a>(
        &'a self,
        vmid: Vmid,
        task_type: &'a str,
        since: i64,
        exclude: &'a [String],
    ) -> BoxFut<'a, Result<Option<Upid>, ProxmoxError>>;
}

impl Pve for Client {
    fn list(&self) -> BoxFut<'_, Result<Vec<GuestSummary>, ProxmoxError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for kind in [GuestKind::Lxc, GuestKind::Qemu] {
                for g in self.guests(kind).await? {
                    out.push(GuestSummary {
                        vmid: g.vmid,
                        kind,
                        status: g.status.as_str().to_string(),
                    });
                }
            }
            Ok(out)
        })
    }

    fn guest(&self, kind: GuestKind, vmid: Vmid) -> BoxFut<'_, Result<ActualGuest, ProxmoxError>> {
        Box::pin(async move {
            let status = self.guest_status(kind, vmid).await?;
            let config = self.guest_config(kind, vmid).await?;
            let config_lock = config
                .raw()
                .get("lock")
                .and_then(|v| v.as_str())
                .map(str::to_string);
            let template_in_config = matches!(
                config.raw().get("template"),
                Some(v) if v.as_u64() == Some(1) || v.as_str() == Some("1")
            );
            Ok(ActualGuest {
                vmid,
                kind,
                status: status.status.as_str().to_string(),
                template: status.template || template_in_config,
                lock: status.lock.clone().or(config_lock),
                ha_managed: status.ha.managed,
                config: config.raw().clone(),
            })
        })
    }

    fn start<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>> {
        Box::pin(Client::start(self, permit, kind))
    }

    fn shutdown<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
        timeout: Duration,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>> {
        Box::pin(Client::shutdown(self, permit, kind, timeout, false))
    }

    fn stop<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
    ) -> BoxFut<'a, Result<Upid, ProxmoxError>> {
        Box::pin(Client::stop(self, permit, kind))
    }

    fn set_config<'a>(
        &'a self,
        permit: &'a GuestPermit,
        kind: GuestKind,
        change: &'a ConfigChange,
    ) -> BoxFut<'a, Result<SetConfigOutcome, ProxmoxError>> {
        Box::pin(Client::set_config(self, permit, kind, change))
    }

    fn wait<'a>(
        &'a self,
        upid: &'a Upid,
        timeout: Duration,
    ) -> BoxFut<'a, Result<TaskDone, ProxmoxError>> {
        let opts = WaitOptions {
            timeout,
            initial_interval: Duration::from_millis(50),
            max_interval: Duration::from_secs(2),
        };
        Box::pin(self.wait_task(upid, opts))
    }

    fn find_task<'a>(
        &'a self,
        vmid: Vmid,
        task_type: &'a str,
        since: i64,
        exclude: &'a [String],
    ) -> BoxFut<'a, Result<Option<Upid>, ProxmoxError>> {
        Box::pin(async move {
            let filter = TaskListFilter {
                vmid: Some(vmid),
                typefilter: Some(task_type.to_string()),
                source: Some(TaskSource::All),
                since: Some(since),
                limit: Some(500),
                ..TaskListFilter::default()
            };
            let mut found: Vec<Upid> = self
                .tasks(&filter)
                .await?
                .into_iter()
                .map(|t| t.upid)
                .filter(|u| {
                    u.task_type() == task_type
                        && u.id() == vmid.to_string()
                        && u.user() == self.token_id()
                        && i64::from(u.starttime()) >= since
                        && !exclude.iter().any(|x| x == u.as_str())
                })
                .collect();
            found.sort_by_key(|u| u.starttime());
            Ok(found.into_iter().next())
        })
    }
}
