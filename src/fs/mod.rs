//! Filesystems: probing what a partition holds (type, label, UUID) and,
//! per filesystem, which blocks it uses.

pub mod probe;

pub use probe::{FsInfo, probe};
