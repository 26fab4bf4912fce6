//! TEMPORARY stub.
use std::path::Path;
use super::Disk;
use crate::Result;
/// stub
pub fn check_source(_source: &Disk, _allow_mounted: bool) -> Result<()> { Ok(()) }
/// stub
pub fn check_target(_target: &Disk, _source: Option<&Disk>, _image_dir: Option<&Path>) -> Result<()> { Ok(()) }
/// stub
pub fn check_image_dir_not_on(_source: &Disk, _image_dir: &Path) -> Result<()> { Ok(()) }
