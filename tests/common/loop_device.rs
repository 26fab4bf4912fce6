//! Loop devices for tests that need real block devices (root only), and
//! the `require_root!()` guard for such tests.

#[allow(unused_imports)]
pub use super::shared::{LoopDevice, is_root as have_root, root_tests_required};

/// At the top of a test that needs root: without root, panic when root
/// tests are required, else print "skipping: needs root" and return.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::shared::root_for("") {
            return;
        }
    };
}
