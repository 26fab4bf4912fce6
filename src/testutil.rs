//! Helpers for unit tests.

/// Whether the tests run as root. Without root: false (the caller skips),
/// unless KLON_REQUIRE_ROOT_TESTS=1 says root tests must run: then it
/// panics, so a CI run without root fails instead of skipping them.
pub fn have_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("KLON_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1") {
        panic!("this test needs root and KLON_REQUIRE_ROOT_TESTS=1 is set: run the tests as root");
    }
    false
}
