//! The jobs: backup (disk -> image), verify (image), restore (image -> disk),
//! all running on one ordered parallel pipeline.

pub mod backup;
pub mod cancel;
pub mod clone;
pub mod czimage;
pub mod deploy;
pub mod export;
pub mod feedback;
pub mod grow;
pub mod joblog;
pub mod mount;
pub mod pipeline;
pub mod read_back;
pub mod relayout;
pub mod restore;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod streams;
pub mod target;
pub mod verify;
pub mod volume;
