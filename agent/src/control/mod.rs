//! Local control socket (`/run/felhom/agent.sock`): lets CLI commands reach the running
//! daemon's queue. (Filled by issue 5.)
