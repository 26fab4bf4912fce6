//! The snapshot repository.

pub mod policy;
