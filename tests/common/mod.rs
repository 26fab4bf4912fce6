//! Helpers shared by the integration tests; those the unit tests use too
//! (the root gate, scratch directories, mounts, loop devices) are in
//! `src/testutil/shared.rs`, included here as `shared`.
#![allow(dead_code)]
pub mod clonezilla;
pub mod disks;
pub mod failing;
pub mod garage;
pub mod loop_device;
pub mod lvm_tools;
pub mod repo_disk;
#[path = "../../src/testutil/shared.rs"]
pub mod shared;
pub mod stall;
pub mod terminal;
pub mod thin_fixture;
