//! What each `hypertool` command does, a module per kind: the processes that run (`serve`), the
//! commands that read configuration files only (`offline`), investigations and checks
//! (`diagnose`), and the client of a running server's API (`client`).

pub mod client;
pub mod diagnose;
pub mod offline;
pub mod serve;
