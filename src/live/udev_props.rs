//! With the `udev` feature (dynamically linked builds on a system running
//! udevd): udev's properties for the disks found in /sys — the serial
//! where sysfs has none, and the /dev/disk/by-id names.

use crate::inventory::DiskInfo;

/// Fills in serials from udev (ID_SERIAL_SHORT) where sysfs gave none and
/// returns each disk's /dev/disk/by-id names, in the order of `disks`.
pub fn enrich(disks: &mut [DiskInfo]) -> Vec<Vec<String>> {
    let mut by_id = Vec::with_capacity(disks.len());
    for d in disks.iter_mut() {
        let mut names = Vec::new();
        if let Ok(dev) = udev::Device::from_subsystem_sysname("block".into(), d.name.clone()) {
            if d.serial.is_none() {
                d.serial = dev.property_value("ID_SERIAL_SHORT").map(|v| v.to_string_lossy().into_owned());
            }
            if let Some(links) = dev.property_value("DEVLINKS") {
                names.extend(
                    links
                        .to_string_lossy()
                        .split_whitespace()
                        .filter(|l| l.starts_with("/dev/disk/by-id/"))
                        .map(str::to_string),
                );
            }
        }
        by_id.push(names);
    }
    by_id
}
