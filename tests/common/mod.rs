#![allow(dead_code)]
pub mod disks;
