//! Configuration: JSON file, `FELHOM_AGENT_*` environment overrides, secrets from files or
//! systemd credentials. Owns parsing and validation of every section; must never print a
//! secret. (Filled by issue 2.)
