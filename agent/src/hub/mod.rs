//! Hub reporting: host report types, collector, hub client, heartbeat loop. (Issue 4.)
