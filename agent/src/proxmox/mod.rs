//! Typed Proxmox VE REST client. (Issue 2.)
