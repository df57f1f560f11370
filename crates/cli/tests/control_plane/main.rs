//! Issue 5 end to end, with real processes: `podvisor up` on one machine,
//! and a cluster of etcd, two server replicas and three host daemons on
//! loopback, all running real pod VMs (QEMU; TCG here).

mod ack;
mod cluster;
mod fixture;
mod hibernate;
mod two_hosts;
mod up;
mod volumes;
