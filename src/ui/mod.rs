//! What people see: progress and human-readable numbers.

pub mod disks;
pub mod progress;
pub mod wizard;

pub use crate::units::{human_bytes, human_duration};
