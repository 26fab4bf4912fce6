//! Helpers shared by the integration tests.
#![allow(dead_code)]
pub mod clonezilla;
pub mod disks;
pub mod failing;
pub mod garage;
pub mod loop_device;
pub mod lvm_tools;
pub mod repo_disk;
pub mod stall;
pub mod thin_fixture;
