//! Hub reporting (issue 4): the agent's daemon heartbeat.
//!
//! Background: every poll interval the agent collects a read-only [`report::HostReport`]
//! of its host and POSTs it to the hub; the hub's answer, a [`envelope::ControlEnvelope`],
//! steers it. The POST is the heartbeat: there is no separate ping.
//!
//! Design, one file per concern:
//! - [`report`]: the wire types and their JSON Schema (`docs/hub-report.schema.json`).
//! - [`envelope`]: the hub's answer, the interval clamp, the saved last envelope.
//! - [`smart`]: smartctl JSON → disk entries; disk discovery.
//! - [`audit`]: the helper's audit log, read in order from a cursor kept in `state_dir`.
//! - [`cloudflared`]: the `/ready` prober.
//! - [`client`]: the HTTPS client for the hub (typed errors, token redaction).
//! - [`collector`]: one report from Proxmox, SMART, hwmon, cloudflared, audit, reconcile.
//! - [`heartbeat`]: the loop (timing, backoff, shutdown, reload) behind traits.
//! - [`service`]: the daemon glue (start, reload, systemd notify) and `selftest --hub`.
//!
//! Must never: change anything on the host or in Proxmox (the collector only reads), put
//! the hub token into a log line, an error or `Debug` output, or stop the daemon because a
//! collection or a report failed.

pub mod audit;
pub mod client;
pub mod cloudflared;
pub mod collector;
pub mod envelope;
pub mod heartbeat;
pub mod report;
pub mod service;
pub mod smart;
