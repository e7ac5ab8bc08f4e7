//! Client side of the root fence: talks `felhom-protocol` to the per-class privhelper
//! sockets. Must never execute anything itself. (Issue 3.)
