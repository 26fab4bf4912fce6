//! klon: a disk-imaging engine. Back up a disk into a compressed,
//! checksummed image; verify it; restore it to the same or a larger disk.
//!
//! The data path, one module per stage:
//! - [`device`]: opening disks, ioctls, sysfs, mounts, safety checks
//! - [`table`]: GPT / MBR / no table, and relocating a table on a larger disk
//! - [`fs`]: probing filesystems (type, label) and their used blocks
//! - [`image`]: the on-disk image format (manifest, chunk files, index)
//! - [`engine`]: backup, verify and restore pipelines
//! - [`ui`]: progress and reports
//! - [`live`]: the live USB system (PID 1, unattended jobs, image drive)

pub mod cli;
pub mod clonezilla;
pub mod commands;
pub mod demo;
pub mod device;
pub mod engine;
pub mod error;
pub mod fs;
pub mod image;
pub mod inventory;
pub mod job;
pub mod le;
pub mod live;
pub mod repo;
pub mod scratch;
pub mod table;
#[cfg(test)]
mod testutil;
pub mod ui;
pub mod units;

pub use error::{Error, Result};
